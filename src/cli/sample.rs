//! `ddpo sample`: images for one prompt from a model, as a labelled grid PNG.

use std::path::PathBuf;

use crate::policy::Policy;
use crate::pretrain::eval::write_sample_grid;
use crate::sampler::SamplerConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The text prompt, e.g. "a red circle on a blue background".
    #[arg(long)]
    prompt: String,
    /// Number of images.
    #[arg(short = 'n', long, default_value_t = 8)]
    n: usize,
    /// DDIM steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// DDIM stochasticity (1.0 = DDPM-like, as DDPO uses).
    #[arg(long, default_value_t = 1.0)]
    eta: f64,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Random seed (same seed, same images).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model weights (.safetensors with its .json config beside it).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
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
    let policy = Policy::load(&super::resolve_model(&args.model), &device)?;
    let cfg = SamplerConfig { steps: args.steps, eta: args.eta, guidance: args.guidance };
    cfg.validate(policy.schedule.num_train_timesteps())?;
    let prompts = vec![args.prompt.clone(); args.n];
    write_sample_grid(&policy, &prompts, &cfg, args.seed, &args.out)?;
    eprintln!("wrote {} ({} images of {:?})", args.out.display(), args.n, args.prompt);
    Ok(())
}
