//! `ddpo train`: DDPO finetuning of a diffusion policy on a reward, with a run folder that
//! records everything and resumes after an interruption. Reward, prompt and hooks scripts
//! (`.rhai`, by default the three in `scripts/`) are reloaded at each epoch boundary; each
//! version used is kept in `<run>/scripts/`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::ddpo::{Algorithm, FixedPrompts, Normalisation, Stage, TrainConfig};
use crate::model::LoraConfig;
use crate::optim::AdamWConfig;
use crate::reward::models::ModelPaths;
use crate::run::{RewardSpec, RunConfig};
use crate::session::{EpochLog, Ended, Observer, OnScriptError, ScriptPaths, Session};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to finetune (.safetensors with its .json config beside it).
    #[arg(help_heading = "Model", long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// Finetune a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/) instead of --model: its UNet in full, or LoRA adapters with --lora-rank.
    #[arg(help_heading = "Model", long, value_name = "DIR", conflicts_with = "model")]
    model_dir: Option<PathBuf>,
    /// dtype of the frozen weights of a --model-dir model (f16 / bf16 halve their memory on a
    /// GPU; trained weights stay f32).
    #[arg(help_heading = "Model", long, value_enum, default_value = "f32")]
    dtype: super::DtypeArg,
    /// Run folder (default: runs/<date-time>).
    #[arg(help_heading = "Run folder", long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (other flags are ignored, except
    /// --epochs, which extends or shortens the plan).
    #[arg(help_heading = "Run folder", long, conflicts_with = "run_dir")]
    resume: Option<PathBuf>,
    /// Built-in reward (compressibility, incompressibility, brightness) or a reward script
    /// (a path ending in .rhai), reloaded at each epoch boundary. Default: scripts/reward.rhai
    /// when the working directory has it, else the built-in compressibility.
    #[arg(help_heading = "Scripts and rewards", long)]
    reward: Option<String>,
    /// Prompt script (a path ending in .rhai defining `fn prompt()`), reloaded at each epoch
    /// boundary; replaces the fixed prompt list. Default: scripts/prompts.rhai when the working
    /// directory has it (and no --prompt is given), else the built-in prompt list.
    #[arg(help_heading = "Scripts and rewards", long = "prompts", value_name = "FILE.rhai", conflicts_with = "prompts")]
    prompt_script: Option<PathBuf>,
    /// Schedule hooks (`fn on_epoch_start(ctx)` / `fn on_epoch_end(ctx)`: lr, guidance, reward
    /// weights, prompts, early stop), reloaded at each epoch boundary. Default:
    /// scripts/hooks.rhai when the working directory has it, else none.
    #[arg(help_heading = "Scripts and rewards", long, value_name = "FILE.rhai")]
    hooks: Option<PathBuf>,
    /// Policy-gradient estimator.
    #[arg(help_heading = "Algorithm", long, value_enum, default_value = "is")]
    algo: AlgoArg,
    /// Epochs in all (default 20; with --resume, the run's own plan).
    #[arg(help_heading = "Sampling and batches", long)]
    epochs: Option<usize>,
    #[arg(help_heading = "Sampling and batches", long, default_value_t = defaults().samples_per_epoch)]
    samples_per_epoch: usize,
    #[arg(help_heading = "Sampling and batches", long, default_value_t = defaults().sample_batch_size)]
    sample_batch_size: usize,
    #[arg(help_heading = "Sampling and batches", long, default_value_t = defaults().train_batch_size)]
    train_batch_size: usize,
    #[arg(help_heading = "Sampling and batches", long, default_value_t = defaults().inner_epochs)]
    inner_epochs: usize,
    /// Minibatches per optimizer step.
    #[arg(help_heading = "Sampling and batches", long, default_value_t = defaults().grad_accum)]
    grad_accum: usize,
    #[arg(help_heading = "Algorithm", long, default_value_t = defaults().timestep_fraction)]
    timestep_fraction: f64,
    #[command(flatten, next_help_heading = "Sampling and batches")]
    sampler: super::SamplerArgs,
    #[arg(help_heading = "Optimiser", long, default_value_t = defaults().optimizer.lr)]
    lr: f64,
    /// RWR temperature: samples are weighted by softmax(advantage / beta) (smaller: only the
    /// best samples count).
    #[arg(help_heading = "Algorithm", long, default_value_t = defaults().rwr_beta)]
    rwr_beta: f64,
    /// Optimiser steps of linear learning-rate warm-up at the start of a run.
    #[arg(help_heading = "Optimiser", long, default_value_t = defaults().optimizer.warmup_steps)]
    warmup_steps: usize,
    /// PPO clip range of the per-step importance ratio.
    #[arg(help_heading = "Algorithm", long, default_value_t = defaults().clip_range)]
    clip_range: f64,
    /// Leave trajectory steps whose DDIM noise sigma is below this out of the DDPO-IS / SF loss
    /// (their 1/sigma-weighted score terms are mostly noise; 0 trains on every step).
    #[arg(help_heading = "Algorithm", long, default_value_t = defaults().min_train_sigma)]
    min_train_sigma: f64,
    /// Weight of a penalty on predicted x0 values outside [-1, 1] in the DDPO-IS / SF loss
    /// (keeps the unclamped policy from drifting to saturated frames that no reward can tell
    /// apart). It pulls on every saturated colour, so watch the gold score: on the shipped
    /// default, weight 1 at lr 1e-4 washed the colours out in 20 epochs; a KL term
    /// (--kl-weight) holds the range without that. 0: off. Pixel-space models only.
    #[arg(help_heading = "Algorithm", long, default_value_t = defaults().range_penalty)]
    range_penalty: f64,
    /// Weight of a KL term to the base model in the DDPO-IS / SF loss (the closed-form KL of each
    /// trained step's Gaussian to the shipped model's, per pixel): changes the reward does not
    /// pay for are pulled back. Costs one more forward pass per trained step; with --lora the
    /// reference is the same model with its adapters off (no second copy). 0: off. Default:
    /// 0.3 for DDPO-IS and SF, off for RWR (which has no KL term): without it the quick start's
    /// 20 epochs wore the shipped model down to dark noise (suite gold 0.58 -> 0.00), with it
    /// the shapes stay (README, "Training results").
    #[arg(help_heading = "Algorithm", long)]
    kl_weight: Option<f64>,
    /// Finetune the text encoder too (default: the UNet only, as the DDPO reference).
    #[arg(help_heading = "Model", long)]
    train_text_encoder: bool,
    /// Train only the weights whose name contains one of these (comma-separated or repeated),
    /// e.g. `attn2.to_k,attn2.to_v` for the cross-attention projections of the prompt (Custom
    /// Diffusion's choice): far fewer ways for noisy updates to wear the model down.
    #[arg(help_heading = "Model", long, value_delimiter = ',', value_name = "PATTERN")]
    train_only: Vec<String>,
    /// Normalise rewards over the batch instead of per prompt.
    #[arg(help_heading = "Algorithm", long, conflicts_with = "group_size")]
    batch_norm_rewards: bool,
    /// Every N epochs, score held-out compositional-suite prompts (fixed noise) with the suite's
    /// detector, a gold score the reward never sees, with the samples' diversity and range;
    /// logged as eval/* in metrics.jsonl. 0: never.
    #[arg(help_heading = "Evaluation", long, default_value_t = 0)]
    eval_every: usize,
    /// Gold score of the evaluations: this reward script's mean on the held-out samples instead
    /// of the suite's strict score (which is still logged). Loaded once: edits do not move it.
    #[arg(help_heading = "Evaluation", long, value_name = "FILE.rhai")]
    eval_reward: Option<PathBuf>,
    /// Held-out prompts per evaluation.
    #[arg(help_heading = "Evaluation", long, default_value_t = 24)]
    eval_prompts: usize,
    /// Samples per held-out prompt.
    #[arg(help_heading = "Evaluation", long, default_value_t = 4)]
    eval_per_prompt: usize,
    /// Evaluations over which a rising reward and a falling gold score count as reward hacking.
    #[arg(help_heading = "Evaluation", long, default_value_t = 3)]
    hack_patience: usize,
    /// Keep the checkpoint with the best gold score in RUN/best/.
    #[arg(help_heading = "Evaluation", long)]
    keep_best: bool,
    /// Stop the run when it hacks the reward (the reward rises while the gold score falls) or
    /// when the suite's strict score falls below the base model's beyond its noise, and point to
    /// the best checkpoint.
    #[arg(help_heading = "Evaluation", long)]
    stop_on_hack: bool,
    /// Sample each prompt this many times per epoch, side by side, and take advantages relative
    /// to the group (GRPO); 1: every sample its own prompt, per-prompt statistics.
    #[arg(help_heading = "Algorithm", long, default_value_t = defaults().group_size)]
    group_size: usize,
    /// Start each group from one x_T (DanceGRPO's init_same_noise).
    #[arg(help_heading = "Algorithm", long)]
    same_noise: bool,
    /// With --group-size: divide by the group's standard deviation or the whole batch's
    /// (Flow-GRPO's global_std).
    #[arg(help_heading = "Algorithm", long, value_enum, default_value = "group")]
    adv_std: AdvStd,
    /// Train only sampling steps FROM..TO (0 = the noisiest; TO excluded), as Flow-GRPO-Fast.
    #[arg(help_heading = "Algorithm", long, value_name = "FROM..TO", value_parser = parse_window)]
    train_timesteps: Option<(usize, usize)>,
    /// Flow models: sample steps FROM..TO with the SDE and every other step with the ODE
    /// (Flow-GRPO-Fast), so only the window is stochastic and trained.
    #[arg(help_heading = "Algorithm", long, value_name = "FROM..TO", value_parser = parse_window)]
    sde_window: Option<(usize, usize)>,
    /// Recompute training log-probs under this guidance while sampling keeps --guidance: 1 is
    /// CFG-free training (one conditional pass per step, half the training compute; RL as
    /// guidance distillation). Default: the sampler's guidance.
    #[arg(help_heading = "Algorithm", long, value_name = "G")]
    train_guidance: Option<f64>,
    /// Per-prompt normalisation: rewards kept per prompt (the last N).
    #[arg(help_heading = "Algorithm", long, default_value_t = per_prompt_defaults().0)]
    stat_buffer: usize,
    /// Per-prompt normalisation: rewards a prompt needs before its own statistics replace the
    /// batch's.
    #[arg(help_heading = "Algorithm", long, default_value_t = per_prompt_defaults().1)]
    stat_min_count: usize,
    #[arg(help_heading = "Sampling and batches", long, default_value_t = defaults().seed)]
    seed: u64,
    /// Epochs between checkpoints.
    #[arg(help_heading = "Run folder", long, default_value_t = 5)]
    checkpoint_every: usize,
    /// Train LoRA adapters of this rank on the UNet's attention projections instead of all
    /// weights (left out: every weight trains).
    #[arg(help_heading = "Model", long)]
    lora_rank: Option<usize>,
    /// LoRA scale numerator (alpha / rank scales the adapter); default: the rank.
    #[arg(help_heading = "Model", long)]
    lora_alpha: Option<f64>,
    /// CLIP behind the scripts' `clip_similarity` (and `aesthetic`): a Hugging Face CLIP
    /// `model.safetensors` (ViT-B/32 or ViT-L/14, with vocab.json and merges.txt beside it) or
    /// its folder, or a small shapes CLIP; default: models/shapes-clip.safetensors.
    #[arg(help_heading = "Scripts and rewards", long)]
    clip: Option<PathBuf>,
    /// Aesthetic head behind the scripts' `aesthetic`: the LAION predictor (.pth or
    /// .safetensors, with a ViT-L/14 --clip) or a small head; default:
    /// models/shapes-aesthetic.safetensors.
    #[arg(help_heading = "Scripts and rewards", long)]
    aesthetic: Option<PathBuf>,
    /// Training prompt (repeatable); default: 8 fixed shapes-world prompts (45 animal names,
    /// the reference's `simple_animals`, for --model-dir).
    #[arg(help_heading = "Scripts and rewards", long = "prompt")]
    prompts: Vec<String>,
    #[arg(help_heading = "Device", long, default_value = "cpu")]
    device: String,
    /// Threads scoring rewards while sampling goes on (script rewards share one compiled AST).
    #[arg(help_heading = "Scripts and rewards", long, default_value_t = defaults().reward_workers)]
    reward_workers: usize,
    /// When a reward or prompt script fails during an epoch (throws, returns a non-number, NaN,
    /// or hits a sandbox limit): `wait` keeps the model untouched and waits for a fixed script to
    /// be saved, then retries the epoch; `exit` checkpoints and exits.
    #[arg(help_heading = "Scripts and rewards", long, value_enum, default_value = "wait")]
    on_error: OnError,
    #[command(flatten, next_help_heading = "Vision-language model")]
    vlm: super::vlm::VlmArgs,
}

/// What `train` does when a script fails mid-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    Wait,
    Exit,
}

/// `--algo`: the policy-gradient estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AlgoArg {
    /// Importance sampling with PPO clipping (several updates per batch).
    Is,
    /// Score function (REINFORCE): one gradient step per sampled batch.
    Sf,
    /// Reward-weighted regression on the denoising loss (the paper's baseline).
    Rwr,
}

impl From<AlgoArg> for Algorithm {
    fn from(a: AlgoArg) -> Self {
        match a {
            AlgoArg::Is => Algorithm::Is,
            AlgoArg::Sf => Algorithm::Sf,
            AlgoArg::Rwr => Algorithm::Rwr,
        }
    }
}

/// `--adv-std`: which standard deviation scales a group's advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AdvStd {
    Group,
    Global,
}

/// `FROM..TO` as a window of step indices.
fn parse_window(text: &str) -> Result<(usize, usize), String> {
    let (from, to) = text.split_once("..").ok_or_else(|| format!("{text:?} is not FROM..TO, e.g. 0..5"))?;
    let number = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("{s:?} in {text:?} is not a step index"));
    Ok((number(from)?, number(to)?))
}

impl Args {
    /// The gold evaluation `--eval-every` asks for.
    fn gold(&self) -> anyhow::Result<Option<crate::eval::gold::GoldConfig>> {
        if self.eval_every == 0 {
            anyhow::ensure!(!self.keep_best && !self.stop_on_hack && self.eval_reward.is_none(), "--keep-best, --stop-on-hack and --eval-reward need --eval-every N");
            return Ok(None);
        }
        let gold = crate::eval::gold::GoldConfig {
            every: self.eval_every,
            prompts: self.eval_prompts,
            per_prompt: self.eval_per_prompt,
            patience: self.hack_patience,
            keep_best: self.keep_best,
            stop_on_hack: self.stop_on_hack,
            reward: self.eval_reward.as_deref().map(|p| script_path(p, "--eval-reward")).transpose()?,
        };
        gold.validate().map_err(super::flag_error)?;
        Ok(Some(gold))
    }

    /// How rewards become advantages: per prompt (the default), over the batch, or within groups.
    fn normalisation(&self) -> Normalisation {
        if self.batch_norm_rewards {
            Normalisation::Batch
        } else if self.group_size > 1 {
            Normalisation::Group { global_std: self.adv_std == AdvStd::Global }
        } else {
            Normalisation::PerPrompt { buffer_size: self.stat_buffer, min_count: self.stat_min_count }
        }
    }

    /// The adapters `--lora-rank` / `--lora-alpha` ask for.
    fn lora(&self) -> anyhow::Result<Option<LoraConfig>> {
        let Some(rank) = self.lora_rank else {
            anyhow::ensure!(self.lora_alpha.is_none(), "--lora-alpha needs --lora-rank");
            return Ok(None);
        };
        anyhow::ensure!(rank > 0, "--lora-rank must be at least 1 (leave it out to finetune every weight)");
        let alpha = self.lora_alpha.unwrap_or(rank as f64);
        anyhow::ensure!(alpha > 0.0 && alpha.is_finite(), "--lora-alpha must be a positive number, got {alpha}");
        Ok(Some(LoraConfig { rank, alpha }))
    }

    /// The prompt and hooks scripts, made absolute so `--resume` finds them from anywhere.
    pub(super) fn script_paths(&self) -> anyhow::Result<ScriptPaths> {
        Ok(ScriptPaths {
            prompts: self.prompt_script.as_deref().map(|p| script_path(p, "--prompts")).transpose()?,
            hooks: self.hooks.as_deref().map(|p| script_path(p, "--hooks")).transpose()?,
        })
    }

    pub(super) fn run_config(&self) -> anyhow::Result<RunConfig> {
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
            algorithm: self.algo.into(),
            samples_per_epoch: self.samples_per_epoch,
            sample_batch_size: self.sample_batch_size,
            train_batch_size: self.train_batch_size,
            inner_epochs: self.inner_epochs,
            grad_accum: self.grad_accum,
            timestep_fraction: self.timestep_fraction,
            clip_range: self.clip_range,
            rwr_beta: self.rwr_beta,
            normalisation: self.normalisation(),
            group_size: self.group_size,
            same_noise: self.same_noise,
            train_timesteps: self.train_timesteps,
            train_guidance: self.train_guidance,
            optimizer: AdamWConfig { lr: self.lr, warmup_steps: self.warmup_steps, ..Default::default() },
            sampler: crate::family::SamplerConfig { sde_window: self.sde_window, ..self.sampler.settings(&defaults().sampler) },
            seed: self.seed,
            reward_workers: self.reward_workers,
            train_text_encoder: self.train_text_encoder,
            train_only: self.train_only.clone(),
            min_train_sigma: self.min_train_sigma,
            range_penalty: self.range_penalty,
            kl_weight: self.kl_weight.unwrap_or_else(|| TrainConfig::default_kl_weight(self.algo.into())),
            ..Default::default()
        };
        train.validate().map_err(super::flag_error)?;
        let reward = match RewardSpec::from(self.reward.clone().unwrap_or_else(|| "compressibility".into())) {
            RewardSpec::Script(path) => RewardSpec::Script(script_path(&path, "--reward")?),
            RewardSpec::Builtin(name) => {
                crate::reward::builtin(&name).map_err(|e| anyhow::anyhow!("{e}, or a reward script ending in .rhai"))?;
                RewardSpec::Builtin(name)
            }
        };
        // With a prompt script the fixed list is unused (the script's path is kept in the run folder).
        let prompts = if self.prompt_script.is_some() { Vec::new() } else { prompts };
        Ok(RunConfig {
            train,
            model: match &self.model_dir {
                // Absolute, so `--resume` finds the folder from anywhere.
                Some(dir) => crate::family::check_model_dir(dir)?,
                None => super::resolve_model(&self.model),
            },
            dtype: self.dtype.into(),
            reward,
            prompts,
            epochs,
            checkpoint_every: self.checkpoint_every,
            ranks: 1,
            lora: self.lora()?,
            reward_models: ModelPaths {
                clip: self.clip.as_deref().map(|p| existing(p, "--clip")).transpose()?,
                aesthetic: self.aesthetic.as_deref().map(|p| existing(p, "--aesthetic")).transpose()?,
                vlm: self.vlm.config()?,
            },
            clip_sample: Some(self.sampler.clip_sample.unwrap_or(false)),
            eval: self.gold()?,
        })
    }
}

/// Trains in this process, or as one rank of a data-parallel run when started by `mpirun`. A
/// rank that fails alone takes the others down with it (MPI's abort), naming itself.
pub fn exec(args: Args) -> anyhow::Result<()> {
    let device = super::device(&args.device)?;
    let dist = crate::dist::from_environment(&device)?;
    let result = exec_as(args, dist.clone(), &device);
    match &result {
        Err(e) if dist.size() > 1 && !crate::dist::failed_together(e) => {
            eprintln!("error on rank {} of {}: {e:#}", dist.rank(), dist.size());
            dist.abort(1);
        }
        // Rank 0 says why every rank stopped.
        Err(_) if !dist.is_root() => anyhow::bail!("rank {} of {} stopped with the others", dist.rank(), dist.size()),
        _ => {}
    }
    result
}

fn exec_as(args: Args, dist: std::sync::Arc<dyn crate::dist::Collectives>, device: &candle_core::Device) -> anyhow::Result<()> {
    let on_error = match args.on_error {
        OnError::Wait => OnScriptError::Wait,
        OnError::Exit => OnScriptError::Exit,
    };
    if dist.size() == 1 {
        return run(open_session(args, 1, device)?.on_script_error(on_error), false);
    }
    let root = if dist.is_root() { Some(open_session(args, dist.size(), device)?) } else { None };
    let session = Session::join(root, dist.clone(), super::stderr_log(), device).map_err(super::flag_error)?;
    if dist.is_root() {
        eprintln!("data-parallel over {} ranks: each samples {} of the epoch's {} samples", dist.size(), session.trainer().config().samples_per_epoch / dist.size(), session.trainer().config().samples_per_epoch);
    }
    run(session.on_script_error(on_error), !dist.is_root())
}

/// A warning when the learning-rate warm-up takes a quarter of the run or more, as it does with one
/// optimiser step per epoch (large `--train-batch-size`): the run then trains mostly below `--lr`.
fn warmup_note(train: &TrainConfig, epochs: usize) -> Option<String> {
    let per_epoch = train.optimizer_steps_per_epoch();
    let (steps, warmup) = (epochs * per_epoch, train.optimizer.warmup_steps);
    (4 * warmup >= steps && warmup > 0).then(|| {
        format!(
            "the learning-rate warm-up (--warmup-steps {warmup}) is {}% of this run's {steps} optimiser steps ({per_epoch} per epoch), so most of it trains below --lr; consider --warmup-steps {}",
            100 * warmup / steps.max(1),
            steps / 10
        )
    })
}

/// Creates the run the flags describe, or resumes `--resume`'s, as a run of `ranks` processes.
fn open_session(mut args: Args, ranks: usize, device: &candle_core::Device) -> anyhow::Result<Session> {
    let log = super::stderr_log();
    let session = match &args.resume {
        Some(dir) => {
            let trained_on = crate::run::RunDir::read_config(dir)?.ranks;
            anyhow::ensure!(
                trained_on == ranks,
                "{} was trained by {trained_on} process(es) and resumes only with as many (each owns a fixed share of every epoch): {}",
                dir.display(),
                if trained_on == 1 { "run it without mpirun".to_string() } else { format!("mpirun -np {trained_on} ddpo train --resume {}", dir.display()) }
            );
            let session = Session::resume(dir, args.epochs, log, device).map_err(super::flag_error)?;
            if let Some(note) = session.resume_note() {
                eprintln!("note: {note}");
            }
            eprintln!("resuming {} at epoch {}", dir.display(), session.trainer().epoch());
            session
        }
        None => {
            let defaults = super::scripts::DefaultScripts::find(args.reward.is_none(), args.prompt_script.is_none() && args.prompts.is_empty(), args.hooks.is_none());
            defaults.note();
            args.reward = args.reward.take().or(defaults.reward.map(|p| p.display().to_string()));
            args.prompt_script = args.prompt_script.take().or(defaults.prompts);
            args.hooks = args.hooks.take().or(defaults.hooks);
            let config = RunConfig { ranks, ..args.run_config()? };
            let paths = args.script_paths()?;
            let dir = args.run_dir.clone().unwrap_or_else(default_run_dir);
            let session = Session::create(&dir, config, paths, log, device).map_err(super::flag_error)?;
            let c = session.config();
            eprintln!("training {} with {} ({:?}) into {}", c.model.display(), c.reward, c.train.algorithm, dir.display());
            if let Some(note) = warmup_note(&c.train, c.epochs) {
                eprintln!("note: {note}");
            }
            session
        }
    };
    Ok(session)
}

/// Trains the session to its planned epochs, with a progress bar and one line per epoch
/// (nothing shown by a `quiet` rank: rank 0 speaks for a data-parallel run).
fn run(mut session: Session, quiet: bool) -> anyhow::Result<()> {
    let bar = if quiet { ProgressBar::hidden() } else { stage_bar() };
    session.set_progress(progress_fn(bar.clone()));
    let stop = super::interrupt_flag();
    let plan = session.config().epochs;
    let ended = if quiet {
        session.train(plan, &mut Silent, &stop)?
    } else {
        session.train(plan, &mut EpochLines { bar: &bar }, &stop).map_err(|e| resume_hint(e, &session))?
    };
    if quiet {
        return Ok(());
    }
    let dir = session.run_dir().display();
    match ended {
        Ended::Done => eprintln!("done: {dir} (finetuned weights in {})", session.policy_path().display()),
        Ended::StoppedByHooks { epoch, before: true } => eprintln!("stopped by the hooks before epoch {epoch} (checkpointed in {dir})"),
        Ended::StoppedByHooks { epoch, before: false } => eprintln!("stopped by the hooks after epoch {epoch}; continue with --resume {dir}"),
        Ended::Interrupted { epoch } => eprintln!("stopped after epoch {epoch}; continue with --resume {dir}"),
        Ended::Hacking { epoch, best_epoch } => eprintln!("stopped after epoch {epoch} on reward hacking (--stop-on-hack){}", best_gold(&session, best_epoch)),
        Ended::GoldFell { epoch, best_epoch } => {
            eprintln!("stopped after epoch {epoch}: the suite's score fell beyond its noise (--stop-on-hack){}", best_gold(&session, best_epoch))
        }
    }
    Ok(())
}

/// Where the best gold score was, for the line of a run stopped by the monitor.
fn best_gold(session: &Session, best_epoch: Option<usize>) -> String {
    let kept = session.config().eval.as_ref().is_some_and(|g| g.keep_best);
    let dir = session.run_dir().display();
    format!(
        "; the best gold score was after epoch {}{}",
        best_epoch.map_or("?".into(), |e| e.to_string()),
        if kept { format!(", kept in {dir}/best/") } else { String::new() }
    )
}

/// A failed run's error, with the flag that continues it.
fn resume_hint(e: anyhow::Error, session: &Session) -> anyhow::Error {
    // The rank-agreement marker survives (see `exec`): ranks that failed together need no abort.
    let together = crate::dist::failed_together(&e);
    let hinted = anyhow::anyhow!("{e:#}; fix the problem and continue with --resume {}", session.run_dir().display());
    if together {
        hinted.context(crate::dist::StopTogether)
    } else {
        hinted
    }
}

/// Shows each stage's progress on `bar`.
fn progress_fn(bar: ProgressBar) -> crate::ddpo::ProgressFn {
    let mut last_stage = None;
    let mut started = std::time::Instant::now();
    Box::new(move |stage, done, total| {
        if last_stage != Some(stage) {
            last_stage = Some(stage);
            started = std::time::Instant::now();
            bar.reset();
            bar.set_message("");
            bar.set_prefix(match stage {
                Stage::Sampling => "sampling",
                Stage::Training => "training",
            });
        }
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        // A rate once a whole second and some work lie behind it (the first updates have none).
        let seconds = started.elapsed().as_secs_f64();
        if seconds >= 1.0 && done > 0 {
            let unit = if stage == Stage::Sampling { "images/s" } else { "passes/s" };
            bar.set_message(format!("{:.1} {unit}", done as f64 / seconds));
        }
    })
}

/// Shows nothing (the ranks of a data-parallel run other than 0).
struct Silent;

impl Observer for Silent {
    fn line(&mut self, _text: &str) {}
    fn epoch(&mut self, _epoch: &EpochLog) {}
}

/// Prints a session's lines above the progress bar, one line per epoch.
pub(super) struct EpochLines<'a> {
    pub bar: &'a ProgressBar,
}

impl Observer for EpochLines<'_> {
    fn line(&mut self, text: &str) {
        super::say(self.bar, text.to_string());
    }

    fn epoch(&mut self, e: &EpochLog) {
        let r = e.report;
        // Pixel-space runs: how much of the final samples lies outside [-1, 1] (clipped).
        let mut range = if r.out_of_range.is_finite() { format!("  out {:.0}%", 100.0 * r.out_of_range) } else { String::new() };
        if e.kl_weight > 0.0 {
            range += &format!("  kl_base {:.1e}", r.kl_base);
        }
        let hashes: String = e.scripts.iter().map(|(name, h)| format!("  {name}@{}", &h[..8])).collect();
        // An epoch that ends with a gold evaluation says what it found.
        let gold = e.metric("eval/gold");
        let gold = if gold.is_finite() {
            let change = [e.metric("eval/strict_change"), e.metric("eval/strict_change_low"), e.metric("eval/strict_change_high")];
            let change = change.iter().all(|v| v.is_finite()).then_some((change[0], change[1], change[2]));
            format!("  | gold {}", crate::session::gold_summary(gold, change, e.metric("eval/diversity"), e.metric("eval/out_of_range")))
        } else {
            String::new()
        };
        super::say(self.bar, format!(
            "epoch {:>3}  reward {:+.4} ± {:.4}  loss {:+.2e}  kl {:.1e}  clip {:.2}{range}  sample {:.1}s reward {:.2}s train {:.1}s{hashes}{gold}",
            r.epoch,
            e.metric("reward_mean"),
            e.metric("reward_std"),
            r.loss,
            r.approx_kl,
            r.clipfrac,
            r.seconds_sampling,
            r.seconds_reward,
            r.seconds_training
        ) + super::scripts::log_suffix(e.start).as_str());
    }
}

/// The library's defaults, which the flags' defaults are.
fn defaults() -> TrainConfig {
    TrainConfig::default()
}

/// The default per-prompt normalisation's (buffer size, minimum count).
fn per_prompt_defaults() -> (usize, usize) {
    Normalisation::PER_PROMPT
}

/// Epochs of a run when --epochs is not given.
const DEFAULT_EPOCHS: usize = 20;

/// An existing `.rhai` file, made absolute so `--resume` finds it from anywhere.
pub(super) fn script_path(path: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(path.extension().is_some_and(|e| e == "rhai"), "{flag} {}: a script must end in .rhai", path.display());
    std::fs::canonicalize(path).with_context(|| format!("{flag} {}: no such script", path.display()))
}

/// An existing model file or folder, made absolute so `--resume` finds it from anywhere.
fn existing(path: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{flag} {}: no such file or folder", path.display()))
}

/// One progress bar reused for each stage of each epoch (hidden when stderr is not a terminal).
pub(super) fn stage_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} {bar:30} {pos}/{len} {msg} {elapsed}").expect("valid template"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warmup_note_fires_when_warmup_is_a_quarter_of_the_run() {
        // 64 samples in one minibatch: one optimiser step per epoch, so 16 warm-up steps are
        // 53% of 30 epochs and 8% of 200.
        let one_step = TrainConfig { samples_per_epoch: 64, train_batch_size: 64, ..defaults() };
        assert_eq!(one_step.optimizer_steps_per_epoch(), 1);
        let note = warmup_note(&one_step, 30).expect("16 of 30 steps warm up");
        assert!(note.contains("53% of this run's 30 optimiser steps") && note.contains("--warmup-steps 3"), "{note}");
        assert!(warmup_note(&one_step, 200).is_none());
        // The defaults: 32 samples in minibatches of 8, 4 steps per epoch, 80 in 20 epochs.
        assert_eq!(defaults().optimizer_steps_per_epoch(), 4);
        assert!(warmup_note(&defaults(), DEFAULT_EPOCHS).is_none());
        let accumulated = TrainConfig { inner_epochs: 2, grad_accum: 3, ..defaults() };
        assert_eq!(accumulated.optimizer_steps_per_epoch(), 3, "8 minibatches, a step every 3");
        assert_eq!(TrainConfig { algorithm: Algorithm::Sf, ..defaults() }.optimizer_steps_per_epoch(), 1);
    }
}
