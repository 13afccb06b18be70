//! `ddpo repl`: an interactive Rhai session with the model and scripts loaded. The model side
//! ([`ModelHost`]: sampling, DDPO epochs on the loaded policy with the schedule hooks, options,
//! reloads, a run folder)
//! plugs into [`crate::script::repl::Repl`]; [`open`] builds a session that tests drive line by
//! line, and [`exec`] wraps it in a rustyline editor (history in the run folder).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use image::RgbImage;

use crate::ddpo::TrainConfig;
use crate::run::{RewardSpec, RunConfig};
use crate::script::repl::{Repl, ReplHost};
use crate::script::Log;
use crate::session::{EpochLog, Ended, Observer, OnScriptError, ScriptPaths, Session};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model to load (.safetensors with its .json config beside it).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    model: PathBuf,
    /// Reward script: `reward(img, prompt)` in the REPL, and the reward `train(n)` optimises.
    #[arg(long, default_value = "scripts/reward.rhai")]
    reward: PathBuf,
    /// Prompt script `train(n)` draws its prompts from.
    #[arg(long = "prompts", default_value = "scripts/prompts.rhai")]
    prompts: PathBuf,
    /// Schedule hooks `train(n)` calls at each epoch boundary (default: scripts/hooks.rhai
    /// when it exists).
    #[arg(long, value_name = "FILE.rhai")]
    hooks: Option<PathBuf>,
    /// Run folder for `train(n)`'s metrics and checkpoints, `show`'s PNGs and the history
    /// (default: runs/repl-<date-time>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Seed of sampling and training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten, next_help_heading = "Vision-language model")]
    vlm: super::vlm::VlmArgs,
}

/// What a session loads.
pub struct Options {
    pub model: PathBuf,
    pub reward: PathBuf,
    pub prompts: PathBuf,
    /// Schedule hooks for `train(n)`, if any.
    pub hooks: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub seed: u64,
    pub device: candle_core::Device,
    /// Where `print` of the reward and prompt scripts goes.
    pub log: Log,
    /// Set (by Ctrl-C) to stop `train(n)` at the next epoch boundary; cleared when it does.
    pub interrupt: Arc<AtomicBool>,
    /// The endpoint of the reward script's `vlm_ask` / `vlm_score`, if any.
    pub vlm: Option<crate::reward::vlm::VlmConfig>,
}

/// A REPL session on a loaded model: a training session (the policy trainable, the scripts,
/// a run folder) behind the REPL's functions.
pub fn open(o: Options) -> anyhow::Result<Repl> {
    let defaults = TrainConfig::default();
    let config = RunConfig {
        train: TrainConfig { seed: o.seed, kl_weight: TrainConfig::default_kl_weight(defaults.algorithm), ..defaults },
        model: o.model.clone(),
        reward: RewardSpec::Script(o.reward.clone()),
        prompts: Vec::new(),
        epochs: 0,
        checkpoint_every: 1,
        ranks: 1,
        lora: None,
        dtype: Default::default(),
        reward_models: crate::reward::models::ModelPaths { vlm: o.vlm.clone(), ..Default::default() },
        // As `ddpo train`: DDPO trains the unclamped policy.
        clip_sample: Some(false),
        eval: None,
    };
    let paths = ScriptPaths { prompts: Some(o.prompts.clone()), hooks: o.hooks.clone() };
    // A run folder or a run's checkpoint works too; an adapter goes on its base and trains on.
    let source = crate::run::resolve_model(&o.model, None)?;
    let loaded = format!("loaded {source}");
    let device = o.device.clone();
    let open = move |c: &RunConfig, frozen: bool| -> anyhow::Result<Box<dyn crate::family::Family>> {
        let options = crate::family::OpenOptions { clip_sample: c.clip_sample, ..Default::default() };
        match (&source.weights, frozen) {
            (Some(w), _) => crate::family::open_frozen(&source.model, Some(w), &options, &device),
            (None, true) => crate::family::open_frozen(&source.model, None, &options, &device),
            (None, false) => crate::family::open_trainable(&source.model, &options, &device),
        }
    };
    let session = Session::create_with(&o.run_dir, config, paths, o.log, &o.device, &open)?.on_script_error(OnScriptError::Fail);
    eprintln!("{loaded}");
    let reward = session.script_reward();
    let host = ModelHost { state: Mutex::new(State { session, samples: 0 }), interrupt: o.interrupt };
    Ok(Repl::new(Arc::new(host), reward, o.run_dir))
}

struct State {
    session: Session,
    /// Images sampled so far (each `sample` call draws fresh noise from the seed).
    samples: u64,
}

/// The model side of the REPL.
pub struct ModelHost {
    state: Mutex<State>,
    interrupt: Arc<AtomicBool>,
}

/// Collects a session's lines as the REPL's output of `train(n)`.
#[derive(Default)]
struct Transcript(String);

impl Observer for Transcript {
    fn line(&mut self, text: &str) {
        self.0 += text;
        self.0.push('\n');
    }

    fn epoch(&mut self, e: &EpochLog) {
        let r = e.report;
        self.0 += &format!(
            "epoch {:>3}  reward {:+.4} ± {:.4}  loss {:+.2e}  {:.1}s{}\n",
            r.epoch,
            e.metric("reward_mean"),
            e.metric("reward_std"),
            r.loss,
            r.seconds_sampling + r.seconds_reward + r.seconds_training,
            super::scripts::log_suffix(e.start)
        );
    }
}

impl ReplHost for ModelHost {
    fn sample(&self, prompt: &str, n: usize) -> anyhow::Result<Vec<RgbImage>> {
        anyhow::ensure!(!prompt.trim().is_empty(), "sample(): the prompt is empty");
        let mut s = self.state.lock().unwrap();
        let cfg = s.session.trainer().config().clone();
        let seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(s.samples);
        s.samples += n as u64;
        let prompts = vec![prompt.to_string(); n];
        crate::sampler::sample_images(s.session.trainer().policy(), &prompts, &cfg.sampler, seed, cfg.sample_batch_size)
    }

    fn train(&self, epochs: usize) -> anyhow::Result<String> {
        let mut s = self.state.lock().unwrap();
        // A Ctrl-C from before this call (e.g. during sample()) is not meant for it.
        self.interrupt.store(false, Ordering::SeqCst);
        let mut out = Transcript::default();
        let until = s.session.trainer().epoch() + epochs;
        // A failing script leaves the policy untouched: the error ends train(), not the session.
        let ended = s.session.train(until, &mut out, &self.interrupt).map_err(|e| anyhow::anyhow!("{}{e:#}", out.0))?;
        self.interrupt.store(false, Ordering::SeqCst);
        match ended {
            Ended::Done => {}
            Ended::StoppedByHooks { epoch, before: true } => out.0 += &format!("stopped by the hooks before epoch {epoch}\n"),
            Ended::StoppedByHooks { epoch, before: false } => out.0 += &format!("stopped by the hooks after epoch {epoch}\n"),
            Ended::Interrupted { epoch } => out.0 += &format!("interrupted: stopped after epoch {epoch}\n"),
            Ended::Hacking { epoch, .. } => out.0 += &format!("stopped after epoch {epoch} on reward hacking\n"),
            Ended::GoldFell { epoch, .. } => out.0 += &format!("stopped after epoch {epoch}: the suite's score fell beyond its noise\n"),
        }
        s.session.checkpoint()?;
        out.0 += &format!("checkpoint: {}\n", s.session.policy_path().display());
        Ok(out.0)
    }

    fn reload(&self) -> anyhow::Result<String> {
        let reloads = self.state.lock().unwrap().session.reload();
        Ok(if reloads.is_empty() { "no script changed\n".into() } else { reloads.iter().map(|r| format!("{r}\n")).collect() })
    }

    fn set(&self, key: &str, value: f64) -> anyhow::Result<()> {
        let mut s = self.state.lock().unwrap();
        let mut c = s.session.trainer().config().clone();
        let count = || -> anyhow::Result<usize> {
            anyhow::ensure!(value >= 0.0 && value.fract() == 0.0, "set({key:?}, {value}): expected a whole number");
            Ok(value as usize)
        };
        match key {
            "lr" => c.optimizer.lr = value,
            "guidance" => c.sampler.guidance = value,
            "eta" => c.sampler.eta = value,
            "steps" => c.sampler.steps = count()?,
            "samples_per_epoch" => c.samples_per_epoch = count()?,
            "sample_batch_size" => c.sample_batch_size = count()?,
            "train_batch_size" => c.train_batch_size = count()?,
            "inner_epochs" => c.inner_epochs = count()?,
            "clip_range" => c.clip_range = value,
            "seed" => c.seed = count()? as u64,
            other => anyhow::bail!("set({other:?}, ..): unknown option; the options are {}", OPTIONS.join(", ")),
        }
        s.session.reconfigure(c).with_context(|| format!("set({key:?}, {value})"))
    }

    fn options(&self) -> Vec<(String, f64)> {
        let c = self.state.lock().unwrap().session.trainer().config().clone();
        let values = [
            c.optimizer.lr,
            c.sampler.guidance,
            c.sampler.eta,
            c.sampler.steps as f64,
            c.samples_per_epoch as f64,
            c.sample_batch_size as f64,
            c.train_batch_size as f64,
            c.inner_epochs as f64,
            c.clip_range,
            c.seed as f64,
        ];
        OPTIONS.iter().map(|k| k.to_string()).zip(values).collect()
    }
}

const OPTIONS: [&str; 10] =
    ["lr", "guidance", "eta", "steps", "samples_per_epoch", "sample_batch_size", "train_batch_size", "inner_epochs", "clip_range", "seed"];

/// A script path as given, or (for the defaults) inside the crate's checkout.
fn resolve_script(path: &Path, flag: &str) -> anyhow::Result<PathBuf> {
    let p = super::resolve_model(path);
    anyhow::ensure!(p.is_file(), "{flag} {}: no such script", path.display());
    Ok(p)
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    use rustyline::error::ReadlineError;
    let run_dir = args.run_dir.clone().unwrap_or_else(|| {
        let dated = super::train::default_run_dir();
        dated.with_file_name(format!("repl-{}", dated.file_name().unwrap_or_default().to_string_lossy()))
    });
    eprintln!("loading {} ...", args.model.display());
    // Ctrl-C while a line is typed belongs to the line editor; during train(n) it stops at the
    // next epoch boundary.
    let interrupt = super::interrupt_flag_with("\ninterrupted: train() stops after the current epoch (Ctrl-C again to quit)");
    let mut repl = open(Options {
        model: super::resolve_model(&args.model),
        reward: resolve_script(&args.reward, "--reward")?,
        prompts: resolve_script(&args.prompts, "--prompts")?,
        hooks: match &args.hooks {
            Some(p) => Some(resolve_script(p, "--hooks")?),
            None => resolve_script(Path::new("scripts/hooks.rhai"), "--hooks").ok(),
        },
        run_dir: run_dir.clone(),
        seed: args.seed,
        device: super::device(&args.device)?,
        log: super::stderr_log(),
        interrupt: interrupt.clone(),
        vlm: args.vlm.config()?,
    })?;
    eprintln!("ddpo repl: run folder {}; help() lists the functions, Ctrl-D exits", run_dir.display());
    let mut editor = rustyline::DefaultEditor::new().context("cannot start the line editor")?;
    let history = run_dir.join("repl_history.txt");
    let _ = editor.load_history(&history);
    loop {
        let prompt = if repl.is_continuing() { "...> " } else { "ddpo> " };
        match editor.readline(prompt) {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                if let Some(out) = repl.feed(&line) {
                    print!("{out}");
                }
                // A Ctrl-C that came during a call other than train() is spent.
                interrupt.store(false, Ordering::SeqCst);
            }
            Err(ReadlineError::Interrupted) => repl.cancel(), // Ctrl-C: drop the line
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading a line"),
        }
    }
    editor.save_history(&history).with_context(|| format!("cannot save the history to {}", history.display()))?;
    Ok(())
}
