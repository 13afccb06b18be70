//! `ddpo sample`: images for one prompt from a model, as a labelled grid PNG.

use std::path::PathBuf;

use crate::family::OpenOptions;
use crate::sampler::write_sample_grid;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The text prompt, e.g. "a red circle on a blue background".
    #[arg(long)]
    prompt: String,
    /// Number of images.
    #[arg(short = 'n', long, default_value_t = 8)]
    n: usize,
    #[command(flatten)]
    sampler: super::SamplerArgs,
    /// Random seed (same seed, same images).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model weights (.safetensors with its .json config beside it), a run folder, or any run's
    /// `checkpoint/policy.safetensors` (full weights or a LoRA adapter).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// A diffusers Stable Diffusion folder to sample from instead of --model.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// A LoRA adapter trained on the model (e.g. RUN/checkpoint/policy.safetensors of a
    /// `ddpo train --lora-rank R` run); with --model-dir also diffusers/peft LoRA files, or a
    /// run's fully finetuned UNet.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// dtype of the frozen weights of a --model-dir model.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: super::DtypeArg,
    /// Output PNG file.
    #[arg(long)]
    out: PathBuf,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(!args.prompt.trim().is_empty(), "--prompt is empty: give a text such as \"a red circle on a blue background\"");
    anyhow::ensure!(args.n > 0, "-n must be at least 1");
    super::check_png_path(&args.out)?;
    let device = super::device(&args.device)?;
    let model = match &args.model_dir {
        Some(dir) => crate::family::check_model_dir(dir)?,
        None => super::resolve_model(&args.model),
    };
    let source = crate::run::resolve_model(&model, args.lora.as_deref())?;
    let options = OpenOptions { dtype: args.dtype.into(), clip_sample: args.sampler.clip_sample, ..Default::default() };
    let policy = super::open_model(&source, &options, &device)?;
    let cfg = args.sampler.config(policy.as_ref())?;
    let prompts = vec![args.prompt.clone(); args.n];
    write_sample_grid(policy.as_ref(), &prompts, &cfg, args.seed, &args.out)?;
    eprintln!("wrote {} ({} images of {:?})", args.out.display(), args.n, args.prompt);
    Ok(())
}
