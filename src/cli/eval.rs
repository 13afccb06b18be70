//! `ddpo eval`: how well a model follows shapes-world prompts, per attribute, and the mean
//! reward-model scores of its samples (JPEG size, CLIP alignment to the prompt, aesthetic); the
//! before / after measure of a finetuning run. With `--clip`, the small CLIP's zero-shot accuracy
//! per attribute instead. With `--suite compositional`, the compositional benchmark: GenEval's six
//! categories scored by the shapes detector (strict and partial, per category and overall).

use std::path::PathBuf;

use anyhow::Context;

use crate::family::OpenOptions;
use crate::pretrain::eval::{judge_each, reward_agreement, reward_scores, summarise};
use crate::sampler::sample_images_with_range;
use crate::reward::models::{LazyModels, ModelPaths, RewardModels};
use crate::run::merge_json;
use super::stderr_log;
use crate::script::{Limits, ScriptSet};
use crate::world::{parse_caption, Judgement, Prompt, ShapesWorld, WorldConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to evaluate: weights (.safetensors with its .json config beside it), a run folder,
    /// or any run's `checkpoint/policy.safetensors` (full weights or a LoRA adapter).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// A LoRA adapter to apply to --model.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Number of prompts drawn from the caption grammar.
    #[arg(short = 'n', long, default_value_t = 200)]
    n: usize,
    /// Evaluate these shapes-world captions instead of grammar draws (repeatable); the JSON then
    /// has a line per prompt as well.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// A diffusers Stable Diffusion folder: refused, since every evaluation here uses
    /// shapes-world prompts and the shapes judge or detector.
    #[arg(long, value_name = "DIR")]
    model_dir: Option<PathBuf>,
    /// Run a fixed benchmark instead: `compositional` (GenEval's six categories on the shapes
    /// world, scored by the shape detector; the latest version) or a versioned name such as
    /// `compositional-v1`.
    #[arg(long, value_name = "NAME")]
    suite: Option<String>,
    /// With --suite: only the `train` or the `heldout` half of the prompts.
    #[arg(long, value_name = "HALF", requires = "suite")]
    half: Option<String>,
    /// With --suite: also write the table as markdown to this file.
    #[arg(long, value_name = "FILE.md", requires = "suite")]
    table: Option<PathBuf>,
    /// With --suite: also run this model (e.g. the base of a finetuning run) on the same prompts
    /// and noise, and report the change of the strict score per category and overall with a 95%
    /// bootstrap interval over prompts: whether a gain is more than noise.
    #[arg(long, value_name = "MODEL", requires = "suite")]
    baseline: Option<PathBuf>,
    /// Samples per --prompt (default 8) or per suite prompt (default 4).
    #[arg(long)]
    per_prompt: Option<usize>,
    /// Write a labelled grid of the evaluated samples (PNG); with --suite a folder, one grid
    /// per category.
    #[arg(long, value_name = "PNG|DIR")]
    grid: Option<PathBuf>,
    /// With --suite: write every sample into this folder (`<index>.png`) with `samples.jsonl`,
    /// a line per sample: its prompt, category, verdicts and what the detector saw (each
    /// object's colour, shape and every shape's template fit). For labelling samples by eye and
    /// checking the detector against them.
    #[arg(long, value_name = "DIR", requires = "suite")]
    samples: Option<PathBuf>,
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
    /// The endpoint of a --reward script's `vlm_ask` / `vlm_score`.
    #[command(flatten, next_help_heading = "Vision-language model")]
    vlm: super::vlm::VlmArgs,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.model_dir {
        anyhow::bail!(
            "--model-dir {}: ddpo eval scores shapes-world prompts, which a Stable Diffusion folder was not trained on; evaluate a shapes model with --model",
            dir.display()
        );
    }
    anyhow::ensure!(args.n > 0, "-n must be at least 1");
    let device = super::device(&args.device)?;
    if let Some(name) = &args.suite {
        return exec_suite(&args, name, &device);
    }
    let per_prompt = args.per_prompt.unwrap_or(8);
    if let Some(clip) = &args.clip {
        use crate::pretrain::clip::{eval_samples, zero_shot};
        let model = crate::reward::shapes_clip::ShapesClip::load(&super::resolve_model(clip), &device)?;
        let report = zero_shot(&model, &eval_samples(&model, args.n)?)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let options = OpenOptions { clip_sample: args.sampler.clip_sample, ..Default::default() };
    let source = crate::run::resolve_model(&super::resolve_model(&args.model), args.lora.as_deref())?;
    let policy = super::open_model(&source, &options, &device)?;
    let cfg = args.sampler.config(policy.as_ref())?;
    let prompts = if args.prompts.is_empty() {
        let size = policy.sample_shape(1)[2] as u32;
        let world = ShapesWorld::new(WorldConfig { size, ..Default::default() })?;
        world.prompts(args.prompt_seed, args.n)
    } else {
        anyhow::ensure!(per_prompt > 0, "--per-prompt must be at least 1");
        given_prompts(&args.prompts, per_prompt)?
    };
    let texts: Vec<String> = prompts.iter().map(|p| p.caption.clone()).collect();
    let (images, out_of_range) = sample_images_with_range(policy.as_ref(), &texts, &cfg, args.seed, 50)?;
    let lazy = LazyModels::new(ModelPaths { vlm: args.vlm.config()?, ..Default::default() }, device.clone());
    let models = lazy.get()?;
    let rewards = args.reward.as_deref().map(|r| reward_totals(r, &images, &texts, lazy)).transpose()?;
    let verdicts = judge_each(&images, &prompts);
    let eval = Eval { images: &images, verdicts: &verdicts, texts: &texts, models: &models, rewards: rewards.as_deref() };
    let mut report = eval.scores(0..images.len())?;
    report["out_of_range"] = serde_json::json!(out_of_range);
    // Whether the model reads its prompts at all (the denoising loss with and without them).
    let conditioning = crate::pretrain::eval::conditioning_gap(policy.as_ref(), &ShapesWorld::default(), 64)?;
    report["conditioning"] = serde_json::json!({ "own": conditioning.own, "shuffled": conditioning.shuffled, "empty": conditioning.empty, "gap": conditioning.gap() });
    // Which words it reads: the loss's rise when one attribute of each caption is changed.
    for (attribute, gap) in crate::pretrain::eval::attribute_gaps(policy.as_ref(), &ShapesWorld::default(), 256)? {
        report["conditioning"][format!("{}_gap", attribute.name())] = serde_json::json!(gap);
    }
    if !args.prompts.is_empty() {
        let per_prompt: anyhow::Result<Vec<serde_json::Value>> = args
            .prompts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let range = i * per_prompt..(i + 1) * per_prompt;
                let mut line = serde_json::json!({ "prompt": text });
                merge_json(&mut line, eval.scores(range)?);
                Ok(line)
            })
            .collect();
        report["per_prompt"] = serde_json::Value::Array(per_prompt?);
    }
    if let Some(path) = &args.grid {
        let cols = if args.prompts.is_empty() { (images.len() as f64).sqrt().ceil() as usize } else { per_prompt };
        crate::render::save_png(&crate::render::labelled_grid(&images, &texts, cols, 3), path)?;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `ddpo eval --suite NAME`: samples the suite's prompts, prints the report as JSON, and
/// writes the markdown table and per-category grids when asked.
fn exec_suite(args: &Args, name: &str, device: &candle_core::Device) -> anyhow::Result<()> {
    use crate::eval::compare::compare;
    use crate::eval::suite::{run_suite, select, write_grids, write_samples, SuiteOptions, SuiteRun};
    use crate::world::suite::{suite, Half, LATEST};
    anyhow::ensure!(args.prompts.is_empty(), "--suite has its own prompts; drop --prompt");
    let half = args
        .half
        .as_deref()
        .map(|h| Half::from_name(h).with_context(|| format!("--half {h:?}: use train or heldout")))
        .transpose()?;
    let prompts = select(&suite(name)?, half);
    let suite_name = if name == "compositional" { LATEST.to_string() } else { name.to_string() };
    let run_model = |model: &std::path::Path, lora: Option<&std::path::Path>| -> anyhow::Result<SuiteRun> {
        let options = OpenOptions { clip_sample: args.sampler.clip_sample, ..Default::default() };
        let source = crate::run::resolve_model(&super::resolve_model(model), lora)?;
        let policy = super::open_model(&source, &options, device)?;
        let sampler = args.sampler.config(policy.as_ref())?;
        let opts = SuiteOptions { suite: suite_name.clone(), half, per_prompt: args.per_prompt.unwrap_or(4), seed: args.seed, sampler };
        run_suite(policy.as_ref(), prompts.clone(), &opts)
    };
    let run = run_model(&args.model, args.lora.as_deref())?;
    let comparison = match &args.baseline {
        Some(baseline) => {
            let base = run_model(baseline, None).with_context(|| format!("--baseline {}", baseline.display()))?;
            Some((compare(&base, &run, args.seed)?, base.report))
        }
        None => None,
    };
    if let Some(path) = &args.table {
        let mut table = run.report.markdown();
        if let Some((c, _)) = &comparison {
            table.push_str(&format!("\n{}", c.markdown()));
        }
        std::fs::write(path, table).with_context(|| format!("cannot write --table {}; check the folder exists", path.display()))?;
    }
    if let Some(dir) = &args.grid {
        write_grids(&run, dir)?;
    }
    if let Some(dir) = &args.samples {
        write_samples(&run, dir)?;
    }
    let mut report = serde_json::to_value(&run.report)?;
    if let Some((c, base)) = comparison {
        eprint!("{}", c.markdown());
        report["baseline"] = serde_json::to_value(base)?;
        report["change"] = serde_json::to_value(c)?;
    }
    println!("{report}");
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
