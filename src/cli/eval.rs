//! `ddpo eval`: how well a model follows shapes-world prompts, per attribute, and the mean
//! reward-model scores of its samples (JPEG size, CLIP alignment to the prompt, aesthetic); the
//! before / after measure of a finetuning run. With `--clip`, the small CLIP's zero-shot accuracy
//! per attribute instead.

use std::path::PathBuf;

use anyhow::Context;

use crate::policy::Policy;
use crate::pretrain::eval::{judge_all, reward_scores, sample_images};
use crate::reward::models::{LazyModels, ModelPaths, RewardModels};
use crate::run::merge_json;
use crate::world::{parse_caption, Prompt, ShapesWorld, WorldConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model weights (.safetensors with its .json config beside it), e.g. a run's
    /// `checkpoint/policy.safetensors`.
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// Number of prompts drawn from the caption grammar.
    #[arg(short = 'n', long, default_value_t = 200)]
    n: usize,
    /// Evaluate these shapes-world captions instead of grammar draws (repeatable); the JSON then
    /// has a line per prompt as well.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// Samples per --prompt.
    #[arg(long, default_value_t = 8)]
    per_prompt: usize,
    /// Write a labelled grid of the evaluated samples (PNG).
    #[arg(long, value_name = "PNG")]
    grid: Option<PathBuf>,
    #[command(flatten)]
    sampler: super::SamplerArgs,
    /// Seed of the prompt draw.
    #[arg(long, default_value_t = 2024)]
    prompt_seed: u64,
    /// Seed of the sampler noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate a small shapes CLIP instead (zero-shot caption choice on -n held-out images,
    /// per attribute; e.g. models/shapes-clip.safetensors).
    #[arg(long)]
    clip: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "-n must be at least 1");
    let device = super::device(&args.device)?;
    if let Some(clip) = &args.clip {
        use crate::pretrain::clip::{eval_samples, zero_shot};
        let model = crate::reward::shapes_clip::ShapesClip::load(&super::resolve_model(clip), &device)?;
        let report = zero_shot(&model, &eval_samples(&model, args.n)?)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let mut policy = Policy::load(&super::resolve_model(&args.model), &device)?;
    if let Some(on) = args.sampler.clip_sample {
        policy.set_clip_sample(on);
    }
    let cfg = args.sampler.config(policy.schedule.num_train_timesteps())?;
    let prompts = if args.prompts.is_empty() {
        let world = ShapesWorld::new(WorldConfig { size: policy.config.image_size as u32, ..Default::default() })?;
        world.prompts(args.prompt_seed, args.n)
    } else {
        anyhow::ensure!(args.per_prompt > 0, "--per-prompt must be at least 1");
        given_prompts(&args.prompts, args.per_prompt)?
    };
    let texts: Vec<String> = prompts.iter().map(|p| p.caption.clone()).collect();
    let images = sample_images(&policy, &texts, &cfg, args.seed, 50)?;
    let models = LazyModels::new(ModelPaths::default(), device.clone()).get()?;
    let mut report = scores(&images, &prompts, &texts, &models)?;
    if !args.prompts.is_empty() {
        let per_prompt: anyhow::Result<Vec<serde_json::Value>> = args
            .prompts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let range = i * args.per_prompt..(i + 1) * args.per_prompt;
                let mut line = serde_json::json!({ "prompt": text });
                merge_json(&mut line, scores(&images[range.clone()], &prompts[range.clone()], &texts[range], &models)?);
                Ok(line)
            })
            .collect();
        report["per_prompt"] = serde_json::Value::Array(per_prompt?);
    }
    if let Some(path) = &args.grid {
        let cols = if args.prompts.is_empty() { (images.len() as f64).sqrt().ceil() as usize } else { args.per_prompt };
        crate::render::save_png(&crate::render::labelled_grid(&images, &texts, cols, 3), path)?;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// The judge's verdicts and the mean reward-model scores of `images` (each with its prompt), as
/// one JSON object.
fn scores(images: &[image::RgbImage], prompts: &[Prompt], texts: &[String], models: &RewardModels) -> anyhow::Result<serde_json::Value> {
    let mut out = serde_json::to_value(judge_all(images, prompts))?;
    merge_json(&mut out, serde_json::to_value(reward_scores(images, texts, models)?)?);
    Ok(out)
}

/// Each of `texts` parsed as a grammar caption (the judge needs its meaning), `per_prompt` times.
fn given_prompts(texts: &[String], per_prompt: usize) -> anyhow::Result<Vec<Prompt>> {
    let mut prompts = Vec::with_capacity(texts.len() * per_prompt);
    for text in texts {
        let spec = parse_caption(text).with_context(|| {
            format!("--prompt {text:?} is not a shapes-world caption (e.g. \"two red circles on a blue background\")")
        })?;
        prompts.extend(std::iter::repeat_n(Prompt { caption: text.clone(), spec }, per_prompt));
    }
    Ok(prompts)
}
