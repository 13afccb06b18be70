//! `ddpo eval`: how well a model follows shapes-world prompts, per attribute, and the mean
//! reward-model scores of its samples (JPEG size, CLIP alignment to the prompt, aesthetic); the
//! before / after measure of a finetuning run. With `--clip`, the small CLIP's zero-shot accuracy
//! per attribute instead.

use std::path::PathBuf;

use anyhow::Context;

use crate::family::OpenOptions;
use crate::pretrain::eval::{judge_each, reward_agreement, reward_scores, summarise};
use crate::sampler::sample_images;
use crate::reward::models::{LazyModels, ModelPaths, RewardModels};
use crate::run::merge_json;
use super::stderr_log;
use crate::script::{Limits, ScriptSet};
use crate::world::{parse_caption, Judgement, Prompt, ShapesWorld, WorldConfig};

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
    /// Also score the samples with this reward (a built-in name or a `.rhai` reward script) and
    /// report how well it agrees with the judge: its mean over the samples the judge passes and
    /// fails, and `reward_auc`, the chance that a passed sample outscores a failed one (per
    /// prompt with --prompt, which is what DDPO's per-prompt normalisation sees).
    #[arg(long, value_name = "REWARD")]
    reward: Option<String>,
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
    let options = OpenOptions { clip_sample: args.sampler.clip_sample, ..Default::default() };
    let policy = crate::family::open_frozen(&super::resolve_model(&args.model), None, &options, &device)?;
    let cfg = args.sampler.config(policy.as_ref())?;
    let prompts = if args.prompts.is_empty() {
        let size = policy.sample_shape(1)[2] as u32;
        let world = ShapesWorld::new(WorldConfig { size, ..Default::default() })?;
        world.prompts(args.prompt_seed, args.n)
    } else {
        anyhow::ensure!(args.per_prompt > 0, "--per-prompt must be at least 1");
        given_prompts(&args.prompts, args.per_prompt)?
    };
    let texts: Vec<String> = prompts.iter().map(|p| p.caption.clone()).collect();
    let images = sample_images(policy.as_ref(), &texts, &cfg, args.seed, 50)?;
    let lazy = LazyModels::new(ModelPaths::default(), device.clone());
    let models = lazy.get()?;
    let rewards = args.reward.as_deref().map(|r| reward_totals(r, &images, &texts, lazy)).transpose()?;
    let verdicts = judge_each(&images, &prompts);
    let eval = Eval { images: &images, verdicts: &verdicts, texts: &texts, models: &models, rewards: rewards.as_deref() };
    let mut report = eval.scores(0..images.len())?;
    if !args.prompts.is_empty() {
        let per_prompt: anyhow::Result<Vec<serde_json::Value>> = args
            .prompts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let range = i * args.per_prompt..(i + 1) * args.per_prompt;
                let mut line = serde_json::json!({ "prompt": text });
                merge_json(&mut line, eval.scores(range)?);
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

/// The evaluated samples, each with its prompt, and what scores them.
struct Eval<'a> {
    images: &'a [image::RgbImage],
    /// The judge's verdict on each image.
    verdicts: &'a [Judgement],
    texts: &'a [String],
    models: &'a RewardModels,
    /// The --reward total of each sample.
    rewards: Option<&'a [f64]>,
}

impl Eval<'_> {
    /// The judge's verdicts, the mean reward-model scores and the --reward's agreement with the
    /// judge over the samples in `range`, as one JSON object.
    fn scores(&self, range: std::ops::Range<usize>) -> anyhow::Result<serde_json::Value> {
        let verdicts = &self.verdicts[range.clone()];
        let mut out = serde_json::to_value(summarise(verdicts))?;
        merge_json(&mut out, serde_json::to_value(reward_scores(&self.images[range.clone()], &self.texts[range.clone()], self.models)?)?);
        if let Some(rewards) = self.rewards {
            let passed: Vec<bool> = verdicts.iter().map(Judgement::passed).collect();
            merge_json(&mut out, serde_json::to_value(reward_agreement(&rewards[range], &passed))?);
        }
        Ok(out)
    }
}

/// Each image's total under `reward` (a built-in name or a `.rhai` script).
fn reward_totals(reward: &str, images: &[image::RgbImage], texts: &[String], models: LazyModels) -> anyhow::Result<Vec<f64>> {
    let reward: Box<dyn crate::reward::Reward> = if reward.ends_with(".rhai") {
        let mut scripts = ScriptSet::new(Limits::default(), stderr_log()).with_models(models);
        Box::new(scripts.load_reward(std::path::Path::new(reward))?)
    } else {
        crate::reward::builtin(reward)?
    };
    let scores = reward.score(images, texts).with_context(|| format!("scoring the samples with --reward {reward:?}", reward = reward.name()))?;
    Ok(scores.iter().map(|s| s.total).collect())
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
