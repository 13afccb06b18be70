//! `ddpo train`: DDPO finetuning of a diffusion policy on a reward, with a run folder that
//! records everything and resumes after an interruption. Reward, prompt and hooks scripts
//! (`.rhai`, by default the three in `scripts/`) are reloaded at each epoch boundary; each
//! version used is kept in `<run>/scripts/`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;

use indicatif::{ProgressBar, ProgressStyle};

use crate::ddpo::{Algorithm, FixedPrompts, Normalisation, Stage, TrainConfig, Trainer};
use crate::model::LoraConfig;
use crate::optim::AdamWConfig;
use crate::policy::Policy;
use crate::reward::models::{LazyModels, ModelPaths};
use crate::run::{RunConfig, RunDir};
use crate::sampler::SamplerConfig;
use crate::script::engine::stderr_log;
use crate::script::{Context as ScriptContext, Limits, Schedule, ScriptSet};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to finetune (.safetensors with its .json config beside it).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// Finetune a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/) instead of --model: its UNet in full, or LoRA adapters with --lora-rank.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// dtype of the frozen weights of a --model-dir model (f16 / bf16 halve their memory on a
    /// GPU; trained weights stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: crate::policy::WeightDtype,
    /// Run folder (default: runs/<date-time>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (other flags are ignored, except
    /// --epochs, which extends or shortens the plan).
    #[arg(long, conflicts_with = "run_dir")]
    resume: Option<PathBuf>,
    /// Built-in reward (compressibility, incompressibility, brightness) or a reward script
    /// (a path ending in .rhai), reloaded at each epoch boundary. Default: scripts/reward.rhai
    /// when the working directory has it, else the built-in compressibility.
    #[arg(long)]
    reward: Option<String>,
    /// Prompt script (a path ending in .rhai defining `fn prompt()`), reloaded at each epoch
    /// boundary; replaces the fixed prompt list. Default: scripts/prompts.rhai when the working
    /// directory has it (and no --prompt is given), else the built-in prompt list.
    #[arg(long = "prompts", value_name = "FILE.rhai", conflicts_with = "prompts")]
    prompt_script: Option<PathBuf>,
    /// Schedule hooks (`fn on_epoch_start(ctx)` / `fn on_epoch_end(ctx)`: lr, guidance, reward
    /// weights, prompts, early stop), reloaded at each epoch boundary. Default:
    /// scripts/hooks.rhai when the working directory has it, else none.
    #[arg(long, value_name = "FILE.rhai")]
    hooks: Option<PathBuf>,
    /// Policy-gradient estimator.
    #[arg(long, value_enum, default_value = "is")]
    algo: Algorithm,
    /// Epochs in all (default 20; with --resume, the run's own plan).
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = 32)]
    samples_per_epoch: usize,
    #[arg(long, default_value_t = 16)]
    sample_batch_size: usize,
    #[arg(long, default_value_t = 8)]
    train_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    inner_epochs: usize,
    /// Minibatches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    timestep_fraction: f64,
    #[command(flatten)]
    sampler: super::SamplerArgs,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// RWR temperature: samples are weighted by softmax(advantage / beta) (smaller: only the
    /// best samples count).
    #[arg(long, default_value_t = 1.0)]
    rwr_beta: f64,
    /// Optimiser steps of linear learning-rate warm-up at the start of a run.
    #[arg(long, default_value_t = 16)]
    warmup_steps: usize,
    /// PPO clip range of the per-step importance ratio.
    #[arg(long, default_value_t = 0.1)]
    clip_range: f64,
    /// Leave trajectory steps whose DDIM noise sigma is below this out of the DDPO-IS / SF loss
    /// (their 1/sigma-weighted score terms are mostly noise; 0 trains on every step).
    #[arg(long, default_value_t = 0.02)]
    min_train_sigma: f64,
    /// Weight of a penalty on predicted x0 values outside [-1, 1] in the DDPO-IS / SF loss
    /// (keeps the unclamped policy from drifting to saturated frames that no reward can tell
    /// apart, e.g. for runs past 20 epochs; 1 is a good start). 0: off. Pixel-space models only.
    #[arg(long, default_value_t = 0.0)]
    range_penalty: f64,
    /// Weight of a KL term to the base model in the DDPO-IS / SF loss (the closed-form KL of each
    /// trained step's Gaussian to the shipped model's, per pixel): changes the reward does not
    /// pay for are pulled back. Costs one more forward pass per trained step. 0: off.
    #[arg(long, default_value_t = 0.0)]
    kl_weight: f64,
    /// Finetune the text encoder too (default: the UNet only, as the DDPO reference).
    #[arg(long)]
    train_text_encoder: bool,
    /// Train only the weights whose name contains one of these (comma-separated or repeated),
    /// e.g. `attn2.to_k,attn2.to_v` for the cross-attention projections of the prompt (Custom
    /// Diffusion's choice): far fewer ways for noisy updates to wear the model down.
    #[arg(long, value_delimiter = ',', value_name = "PATTERN")]
    train_only: Vec<String>,
    /// Normalise rewards over the batch instead of per prompt.
    #[arg(long)]
    batch_norm_rewards: bool,
    /// Per-prompt normalisation: rewards kept per prompt (the last N).
    #[arg(long, default_value_t = 32)]
    stat_buffer: usize,
    /// Per-prompt normalisation: rewards a prompt needs before its own statistics replace the
    /// batch's.
    #[arg(long, default_value_t = 4)]
    stat_min_count: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Epochs between checkpoints.
    #[arg(long, default_value_t = 5)]
    checkpoint_every: usize,
    /// Train LoRA adapters of this rank on the UNet's attention projections instead of all
    /// weights (0: full finetuning).
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    /// LoRA scale numerator (alpha / rank scales the adapter); default: the rank.
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// CLIP behind the scripts' `clip_similarity` (and `aesthetic`): a Hugging Face CLIP
    /// `model.safetensors` (ViT-B/32 or ViT-L/14, with vocab.json and merges.txt beside it) or
    /// its folder, or a small shapes CLIP; default: models/shapes-clip.safetensors.
    #[arg(long)]
    clip: Option<PathBuf>,
    /// Aesthetic head behind the scripts' `aesthetic`: the LAION predictor (.pth or
    /// .safetensors, with a ViT-L/14 --clip) or a small head; default:
    /// models/shapes-aesthetic.safetensors.
    #[arg(long)]
    aesthetic: Option<PathBuf>,
    /// Training prompt (repeatable); default: 8 fixed shapes-world prompts (45 animal names,
    /// the reference's `simple_animals`, for --model-dir).
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Threads scoring rewards while sampling goes on (script rewards share one compiled AST).
    #[arg(long, default_value_t = 1)]
    reward_workers: usize,
    /// When a reward or prompt script fails during an epoch (throws, returns a non-number, NaN,
    /// or hits a sandbox limit): `wait` keeps the model untouched and waits for a fixed script to
    /// be saved, then retries the epoch; `exit` checkpoints and exits.
    #[arg(long, value_enum, default_value = "wait")]
    on_error: OnError,
}

/// What `train` does when a script fails mid-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    Wait,
    Exit,
}

impl Args {
    fn run_config(&self) -> anyhow::Result<RunConfig> {
        let epochs = self.epochs.unwrap_or(DEFAULT_EPOCHS);
        anyhow::ensure!(epochs > 0, "--epochs must be at least 1");
        anyhow::ensure!(self.checkpoint_every > 0, "--checkpoint-every must be at least 1");
        let prompts = match (self.prompts.is_empty(), &self.model_dir) {
            (false, _) => self.prompts.clone(),
            (true, None) => FixedPrompts::shapes_default().0,
            (true, Some(_)) => FixedPrompts::animals().0,
        };
        anyhow::ensure!(prompts.iter().all(|p| !p.trim().is_empty()), "--prompt must not be empty");
        let train = TrainConfig {
            algorithm: self.algo,
            samples_per_epoch: self.samples_per_epoch,
            sample_batch_size: self.sample_batch_size,
            train_batch_size: self.train_batch_size,
            inner_epochs: self.inner_epochs,
            grad_accum: self.grad_accum,
            timestep_fraction: self.timestep_fraction,
            clip_range: self.clip_range,
            rwr_beta: self.rwr_beta,
            normalisation: if self.batch_norm_rewards {
                Normalisation::Batch
            } else {
                Normalisation::PerPrompt { buffer_size: self.stat_buffer, min_count: self.stat_min_count }
            },
            optimizer: AdamWConfig { lr: self.lr, warmup_steps: self.warmup_steps, ..Default::default() },
            sampler: SamplerConfig {
                steps: self.sampler.steps.unwrap_or(super::SamplerArgs::DEFAULT_TRAIN_STEPS),
                eta: self.sampler.eta,
                guidance: self.sampler.guidance,
            },
            seed: self.seed,
            reward_workers: self.reward_workers,
            train_text_encoder: self.train_text_encoder,
            train_only: self.train_only.clone(),
            min_train_sigma: self.min_train_sigma,
            range_penalty: self.range_penalty,
            kl_weight: self.kl_weight,
            ..Default::default()
        };
        train.validate()?;
        let reward = self.reward.clone().unwrap_or_else(|| "compressibility".into());
        let reward = if is_script(&reward) {
            script_path(Path::new(&reward), "--reward")?.display().to_string()
        } else {
            crate::reward::builtin(&reward).map_err(|e| anyhow::anyhow!("{e}, or a reward script ending in .rhai"))?;
            reward
        };
        // With a prompt script the fixed list is unused (the script's path is kept in the run folder).
        let prompts = if self.prompt_script.is_some() { Vec::new() } else { prompts };
        Ok(RunConfig {
            train,
            model: match &self.model_dir {
                // Absolute, so `--resume` finds the folder from anywhere.
                Some(dir) => std::fs::canonicalize(crate::sd::DiffusersFolder::open(dir)?.dir)?,
                None => super::resolve_model(&self.model),
            },
            dtype: self.dtype,
            reward,
            prompts,
            epochs,
            checkpoint_every: self.checkpoint_every,
            lora: (self.lora_rank > 0).then(|| LoraConfig {
                rank: self.lora_rank,
                alpha: self.lora_alpha.unwrap_or(self.lora_rank as f64),
            }),
            reward_models: ModelPaths {
                clip: self.clip.as_deref().map(|p| existing(p, "--clip")).transpose()?,
                aesthetic: self.aesthetic.as_deref().map(|p| existing(p, "--aesthetic")).transpose()?,
            },
            clip_sample: Some(self.sampler.clip_sample.unwrap_or(false)),
        })
    }
}

pub fn exec(mut args: Args) -> anyhow::Result<()> {
    let device = super::device(&args.device)?;
    let (mut run, config, prompt_script, hooks_script) = match &args.resume {
        Some(dir) => {
            let (run, mut config) = RunDir::open(dir)?;
            if let Some(epochs) = args.epochs.filter(|&e| e != config.epochs) {
                anyhow::ensure!(epochs > 0, "--epochs must be at least 1");
                config.epochs = epochs;
                run.save_config(&config)?;
            }
            let (prompt_script, hooks_script) = read_sources(&run.dir)?;
            (run, config, prompt_script, hooks_script)
        }
        None => {
            let defaults = super::schedule::DefaultScripts::find(args.reward.is_none(), args.prompt_script.is_none() && args.prompts.is_empty(), args.hooks.is_none());
            defaults.note();
            args.reward = args.reward.take().or(defaults.reward.map(|p| p.display().to_string()));
            args.prompt_script = args.prompt_script.take().or(defaults.prompts);
            args.hooks = args.hooks.take().or(defaults.hooks);
            let config = args.run_config()?;
            let prompt_script = args.prompt_script.as_deref().map(|p| script_path(p, "--prompts")).transpose()?;
            let hooks_script = args.hooks.as_deref().map(|p| script_path(p, "--hooks")).transpose()?;
            let dir = args.run_dir.clone().unwrap_or_else(default_run_dir);
            let run = RunDir::create(&dir, &config)?;
            if prompt_script.is_some() || hooks_script.is_some() {
                std::fs::create_dir_all(run.dir.join("scripts"))?;
                let sources = serde_json::json!({ "prompts": prompt_script, "hooks": hooks_script });
                std::fs::write(run.dir.join(PROMPT_SCRIPT_FILE), serde_json::to_string_pretty(&sources)?)?;
            }
            (run, config, prompt_script, hooks_script)
        }
    };
    let setup = build_trainer(&config, prompt_script.as_deref(), hooks_script.as_deref(), &device);
    let (mut trainer, mut scripts, mut schedule) = match setup {
        Ok(parts) => parts,
        Err(e) => {
            if args.resume.is_none() {
                run.discard_unstarted(); // a failed start leaves no half-made run behind
            }
            return Err(e);
        }
    };
    if args.resume.is_some() {
        run.restore(&mut trainer)?;
        schedule.replay(&mut trainer, &super::schedule::metrics_records(&run.dir));
        eprintln!("resuming {} at epoch {}", run.dir.display(), trainer.epoch);
    } else {
        eprintln!("training {} with {} ({:?}) into {}", config.model.display(), config.reward, config.train.algorithm, run.dir.display());
    }
    let bar = stage_bar();
    let stage_bar = bar.clone();
    let mut last_stage = None;
    trainer.set_progress(Box::new(move |stage, done, total| {
        if last_stage != Some(stage) {
            last_stage = Some(stage);
            stage_bar.reset();
            stage_bar.set_prefix(match stage {
                Stage::Sampling => "sampling",
                Stage::Training => "training",
            });
        }
        stage_bar.set_length(total as u64);
        stage_bar.set_position(done as u64);
    }));
    let stop = super::interrupt_flag();
    let (mut reward_mean, mut reward_std) = reward_history(&run.dir);
    let mut first = true;
    while trainer.epoch < config.epochs {
        if !scripts.is_empty() {
            // Epoch boundary: pick up edited scripts (a broken edit keeps the previous version).
            if !first {
                for reload in scripts.reload() {
                    eprintln!("{reload}");
                }
            }
            scripts.save_versions(&run.dir.join("scripts"))?;
        }
        first = false;
        let context = script_context(trainer.epoch, &trainer, &reward_mean, &reward_std);
        scripts.set_context(context.clone());
        let start = schedule.epoch_start(&mut trainer, &context);
        if let Some(line) = super::schedule::error_line(&start) {
            super::say(&bar, line);
        }
        if start.stop {
            run.save_checkpoint(&trainer)?;
            eprintln!("stopped by the hooks before epoch {} (checkpointed in {})", trainer.epoch, run.dir.display());
            return Ok(());
        }
        let report = match trainer.run_epoch() {
            Ok(report) => report,
            Err(e) if is_script_error(&e) => {
                // Nothing was updated: the epoch's samples are dropped and the epoch is retried.
                super::say(&bar, format!("epoch {} aborted, the model is untouched: {e:#}", trainer.epoch));
                if args.on_error == OnError::Exit || !wait_for_fix(&mut scripts, &stop, &bar) {
                    run.save_checkpoint(&trainer)?;
                    anyhow::bail!(
                        "stopped at epoch {} on a script error; the run is checkpointed: fix the script and continue with --resume {}",
                        trainer.epoch,
                        run.dir.display()
                    );
                }
                continue;
            }
            Err(e) => {
                return Err(e.context(format!("the last checkpoint in {} is intact; fix the problem and use --resume", run.dir.display())))
            }
        };
        let hashes = record_script_hashes(&run.dir, report.epoch, &scripts)?;
        let m = run.record(&report, super::schedule::record_extra(&scripts, &schedule, &start))?;
        reward_mean.push(m["reward_mean"].as_f64().unwrap_or(f64::NAN));
        reward_std.push(m["reward_std"].as_f64().unwrap_or(f64::NAN));
        // Pixel-space runs: how much of the final samples lies outside [-1, 1] (clipped).
        let mut range = if report.out_of_range.is_finite() { format!("  out {:.0}%", 100.0 * report.out_of_range) } else { String::new() };
        if trainer.config.kl_weight > 0.0 {
            range += &format!("  kl_base {:.1e}", report.kl_base);
        }
        super::say(&bar, format!(
            "epoch {:>3}  reward {:+.4} ± {:.4}  loss {:+.2e}  kl {:.1e}  clip {:.2}{range}  sample {:.1}s reward {:.2}s train {:.1}s{hashes}",
            report.epoch,
            m["reward_mean"].as_f64().unwrap_or(f64::NAN),
            m["reward_std"].as_f64().unwrap_or(f64::NAN),
            report.loss,
            report.approx_kl,
            report.clipfrac,
            report.seconds_sampling,
            report.seconds_reward,
            report.seconds_training
        ) + super::schedule::log_suffix(&start).as_str());
        let end = schedule.epoch_end(&trainer, &script_context(report.epoch, &trainer, &reward_mean, &reward_std), &m);
        if let Some(line) = super::schedule::error_line(&end) {
            super::say(&bar, line);
        }
        if end.stop {
            run.save_checkpoint(&trainer)?;
            eprintln!("stopped by the hooks after epoch {}; continue with --resume {}", report.epoch, run.dir.display());
            return Ok(());
        }
        let interrupted = stop.load(Ordering::SeqCst);
        if trainer.epoch % config.checkpoint_every == 0 || trainer.epoch == config.epochs || interrupted {
            run.save_checkpoint(&trainer)?;
        }
        if interrupted {
            eprintln!("stopped after epoch {}; continue with --resume {}", trainer.epoch - 1, run.dir.display());
            return Ok(());
        }
    }
    eprintln!("done: {} (finetuned weights in {})", run.dir.display(), run.policy_path().display());
    Ok(())
}

/// Whether an epoch failed because of a script (rather than, say, the model).
fn is_script_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<crate::script::ScriptError>().is_some())
}

/// Watches the scripts until a changed version compiles and passes its dry run (true), or
/// Ctrl-C (false). Failed versions are reported once each.
fn wait_for_fix(scripts: &mut ScriptSet, stop: &std::sync::atomic::AtomicBool, bar: &ProgressBar) -> bool {
    super::say(bar, "waiting for a fixed script: save it and the epoch is retried (Ctrl-C checkpoints and stops)".into());
    let mut shown = std::collections::HashSet::new();
    while !stop.load(Ordering::SeqCst) {
        let reloads = scripts.reload();
        for r in &reloads {
            if shown.insert(r.to_string()) {
                super::say(bar, r.to_string());
            }
        }
        if reloads.iter().any(|r| matches!(r.outcome, crate::script::ReloadOutcome::Reloaded { .. })) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    false
}

/// What scripts see of the run at `epoch`: the optimiser step and the finished epochs' rewards.
fn script_context(epoch: usize, trainer: &Trainer, reward_mean: &[f64], reward_std: &[f64]) -> ScriptContext {
    ScriptContext { epoch, step: trainer.opt.step_count(), reward_mean: reward_mean.to_vec(), reward_std: reward_std.to_vec() }
}

/// Where a run started with `--prompts` / `--hooks FILE.rhai` keeps the scripts' paths (for `--resume`).
/// Loads the policy, reward, prompt source and hooks of a run and builds its trainer.
fn build_trainer(
    config: &RunConfig,
    prompt_script: Option<&Path>,
    hooks_script: Option<&Path>,
    device: &candle_core::Device,
) -> anyhow::Result<(Trainer, ScriptSet, Schedule)> {
    let mut policy = Policy::open_trainable(&config.model, config.lora, config.train.seed, config.dtype, device)?;
    if let Some(on) = config.clip_sample {
        policy.set_clip_sample(on);
    }
    let models = LazyModels::new(config.reward_models.clone(), device.clone());
    let mut scripts = ScriptSet::new(Limits::default(), stderr_log()).with_models(models);
    let script_reward = is_script(&config.reward).then(|| scripts.load_reward(Path::new(&config.reward)).map(Arc::new)).transpose()?;
    let reward: Arc<dyn crate::reward::Reward> = match &script_reward {
        Some(r) => r.clone(),
        None => Arc::from(crate::reward::builtin(&config.reward)?),
    };
    let prompts: Box<dyn crate::ddpo::PromptSource> = match prompt_script {
        Some(p) => Box::new(scripts.load_prompts(p)?),
        None => Box::new(FixedPrompts(config.prompts.clone())),
    };
    let hooks = hooks_script.map(|p| scripts.load_hooks(p)).transpose()?;
    let (mut schedule, prompts) = Schedule::new(hooks, script_reward, &config.train, prompts);
    schedule.epochs = config.epochs;
    let mut trainer = Trainer::new(config.train.clone(), policy, reward, prompts)?;
    if config.train.kl_weight > 0.0 {
        // The shipped (or given) model as loaded, never the run's checkpoint: a resumed run
        // keeps measuring against the same base.
        let mut base = Policy::open_frozen(&config.model, None, config.dtype, device)
            .with_context(|| format!("loading the base model {} for --kl-weight", config.model.display()))?;
        if let Some(on) = config.clip_sample {
            base.set_clip_sample(on);
        }
        trainer.set_base(base);
    }
    Ok((trainer, scripts, schedule))
}

/// Epochs of a run when --epochs is not given.
const DEFAULT_EPOCHS: usize = 20;

const PROMPT_SCRIPT_FILE: &str = "scripts/sources.json";

/// Whether `--reward` names a script rather than a built-in reward.
fn is_script(reward: &str) -> bool {
    reward.ends_with(".rhai")
}

/// An existing `.rhai` file, made absolute so `--resume` finds it from anywhere.
fn script_path(path: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(path.extension().is_some_and(|e| e == "rhai"), "{flag} {}: a script must end in .rhai", path.display());
    std::fs::canonicalize(path).with_context(|| format!("{flag} {}: no such script", path.display()))
}

/// An existing model file or folder, made absolute so `--resume` finds it from anywhere.
fn existing(path: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{flag} {}: no such file or folder", path.display()))
}

/// The prompt and hooks scripts a run was started with.
fn read_sources(run_dir: &Path) -> anyhow::Result<(Option<PathBuf>, Option<PathBuf>)> {
    let Ok(text) = std::fs::read_to_string(run_dir.join(PROMPT_SCRIPT_FILE)) else { return Ok((None, None)) };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}/{PROMPT_SCRIPT_FILE} is corrupt", run_dir.display()))?;
    Ok((v["prompts"].as_str().map(PathBuf::from), v["hooks"].as_str().map(PathBuf::from)))
}

/// Reward mean and std of the epochs already in `metrics.jsonl` (for scripts' `context()`).
fn reward_history(run_dir: &Path) -> (Vec<f64>, Vec<f64>) {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["reward_mean"].as_f64().unwrap_or(f64::NAN), v["reward_std"].as_f64().unwrap_or(f64::NAN)))
        .unzip()
}

/// Appends the epoch's script hashes to `scripts/epochs.jsonl` (the versions themselves are
/// `scripts/<name>.<hash>.rhai`); returns them for the epoch's log line.
fn record_script_hashes(run_dir: &Path, epoch: usize, scripts: &ScriptSet) -> anyhow::Result<String> {
    if scripts.is_empty() {
        return Ok(String::new());
    }
    let hashes = scripts.hashes();
    let line = serde_json::json!({ "epoch": epoch, "scripts": hashes });
    let path = run_dir.join("scripts/epochs.jsonl");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot append to {}", path.display()))?;
    writeln!(file, "{line}")?;
    Ok(hashes.iter().map(|(name, h)| format!("  {name}@{}", &h[..8])).collect())
}

/// One progress bar reused for each stage of each epoch (hidden when stderr is not a terminal).
fn stage_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} {bar:30} {pos}/{len} {per_sec} {elapsed}").expect("valid template"),
    );
    bar
}

/// `runs/<YYYYmmdd-HHMMSS>` in UTC, without a date-time dependency.
pub(super) fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    PathBuf::from(format!("runs/{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60))
}
