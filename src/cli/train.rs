//! `ddpo train`: DDPO finetuning of a diffusion policy on a reward, with a run folder that
//! records everything and resumes after an interruption. Reward and prompt scripts (`.rhai`) are
//! reloaded at each epoch boundary; each version used is kept in `<run>/scripts/`.

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
use crate::script::{Context as ScriptContext, Limits, ScriptSet};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to finetune (.safetensors with its .json config beside it).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// Run folder (default: runs/<date-time>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (other flags are ignored).
    #[arg(long, conflicts_with = "run_dir")]
    resume: Option<PathBuf>,
    /// Built-in reward (compressibility, incompressibility, brightness) or a reward script
    /// (a path ending in .rhai, e.g. scripts/reward.rhai), reloaded at each epoch boundary.
    #[arg(long, default_value = "compressibility")]
    reward: String,
    /// Prompt script (a path ending in .rhai defining `fn prompt()`), reloaded at each epoch
    /// boundary; replaces the fixed prompt list.
    #[arg(long = "prompts", value_name = "FILE.rhai", conflicts_with = "prompts")]
    prompt_script: Option<PathBuf>,
    /// Policy-gradient estimator.
    #[arg(long, value_enum, default_value = "is")]
    algo: Algorithm,
    #[arg(long, default_value_t = 20)]
    epochs: usize,
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
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// PPO clip range of the per-step importance ratio.
    #[arg(long, default_value_t = 1e-4)]
    clip_range: f64,
    /// Normalise rewards over the batch instead of per prompt.
    #[arg(long)]
    batch_norm_rewards: bool,
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
    /// Training prompt (repeatable); default: 8 fixed shapes-world prompts.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl Args {
    fn run_config(&self) -> anyhow::Result<RunConfig> {
        anyhow::ensure!(self.epochs > 0, "--epochs must be at least 1");
        anyhow::ensure!(self.checkpoint_every > 0, "--checkpoint-every must be at least 1");
        let prompts = if self.prompts.is_empty() { FixedPrompts::shapes_default().0 } else { self.prompts.clone() };
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
            normalisation: if self.batch_norm_rewards { Normalisation::Batch } else { TrainConfig::default().normalisation },
            optimizer: AdamWConfig { lr: self.lr, ..Default::default() },
            sampler: SamplerConfig { steps: self.sampler.steps, eta: self.sampler.eta, guidance: self.sampler.guidance },
            seed: self.seed,
            ..Default::default()
        };
        train.validate()?;
        let reward = if is_script(&self.reward) {
            script_path(Path::new(&self.reward), "--reward")?.display().to_string()
        } else {
            crate::reward::builtin(&self.reward).map_err(|e| anyhow::anyhow!("{e}, or a reward script ending in .rhai"))?;
            self.reward.clone()
        };
        // With a prompt script the fixed list is unused (the script's path is kept in the run folder).
        let prompts = if self.prompt_script.is_some() { Vec::new() } else { prompts };
        Ok(RunConfig {
            train,
            model: super::resolve_model(&self.model),
            reward,
            prompts,
            epochs: self.epochs,
            checkpoint_every: self.checkpoint_every,
            lora: (self.lora_rank > 0).then(|| LoraConfig {
                rank: self.lora_rank,
                alpha: self.lora_alpha.unwrap_or(self.lora_rank as f64),
            }),
            reward_models: ModelPaths {
                clip: self.clip.as_deref().map(|p| existing(p, "--clip")).transpose()?,
                aesthetic: self.aesthetic.as_deref().map(|p| existing(p, "--aesthetic")).transpose()?,
            },
        })
    }
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let device = super::device(&args.device)?;
    let (mut run, config, prompt_script) = match &args.resume {
        Some(dir) => {
            let (run, config) = RunDir::open(dir)?;
            let prompt_script = read_prompt_script(&run.dir)?;
            (run, config, prompt_script)
        }
        None => {
            let config = args.run_config()?;
            let prompt_script = args.prompt_script.as_deref().map(|p| script_path(p, "--prompts")).transpose()?;
            let dir = args.run_dir.clone().unwrap_or_else(default_run_dir);
            let run = RunDir::create(&dir, &config)?;
            if let Some(p) = &prompt_script {
                std::fs::create_dir_all(run.dir.join("scripts"))?;
                let sources = serde_json::json!({ "prompts": p });
                std::fs::write(run.dir.join(PROMPT_SCRIPT_FILE), serde_json::to_string_pretty(&sources)?)?;
            }
            (run, config, prompt_script)
        }
    };
    let policy = match config.lora {
        Some(lora) => Policy::load_with_new_lora(&config.model, lora, config.train.seed, &device)?,
        None => Policy::load_trainable(&config.model, &device)?,
    };
    let models = LazyModels::new(config.reward_models.clone(), device.clone());
    let mut scripts = ScriptSet::new(Limits::default(), stderr_log()).with_models(models);
    let reward: Arc<dyn crate::reward::Reward> = if is_script(&config.reward) {
        Arc::new(scripts.load_reward(Path::new(&config.reward))?)
    } else {
        Arc::from(crate::reward::builtin(&config.reward)?)
    };
    let prompts: Box<dyn crate::ddpo::PromptSource> = match &prompt_script {
        Some(p) => Box::new(scripts.load_prompts(p)?),
        None => Box::new(FixedPrompts(config.prompts.clone())),
    };
    let mut trainer = Trainer::new(config.train.clone(), policy, reward, prompts)?;
    if args.resume.is_some() {
        run.restore(&mut trainer)?;
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
            scripts.set_context(ScriptContext { epoch: trainer.epoch, reward_mean: reward_mean.clone(), reward_std: reward_std.clone() });
            scripts.save_versions(&run.dir.join("scripts"))?;
        }
        first = false;
        let report = trainer.run_epoch().with_context(|| {
            format!("the last checkpoint in {} is intact; fix the problem and use --resume", run.dir.display())
        })?;
        let hashes = record_script_hashes(&run.dir, report.epoch, &scripts)?;
        let m = run.record(&report, serde_json::json!({ "scripts": scripts.hashes() }))?;
        reward_mean.push(m["reward_mean"].as_f64().unwrap_or(f64::NAN));
        reward_std.push(m["reward_std"].as_f64().unwrap_or(f64::NAN));
        super::say(&bar, format!(
            "epoch {:>3}  reward {:+.4} ± {:.4}  loss {:+.2e}  kl {:.1e}  clip {:.2}  sample {:.1}s reward {:.2}s train {:.1}s{hashes}",
            report.epoch,
            m["reward_mean"].as_f64().unwrap_or(f64::NAN),
            m["reward_std"].as_f64().unwrap_or(f64::NAN),
            report.loss,
            report.approx_kl,
            report.clipfrac,
            report.seconds_sampling,
            report.seconds_reward,
            report.seconds_training
        ));
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

/// Where a run started with `--prompts FILE.rhai` keeps the script's path (for `--resume`).
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

fn read_prompt_script(run_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let Ok(text) = std::fs::read_to_string(run_dir.join(PROMPT_SCRIPT_FILE)) else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}/{PROMPT_SCRIPT_FILE} is corrupt", run_dir.display()))?;
    Ok(v["prompts"].as_str().map(PathBuf::from))
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
fn default_run_dir() -> PathBuf {
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
