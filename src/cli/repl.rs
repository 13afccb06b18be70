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

use crate::ddpo::{TrainConfig, Trainer};
use crate::policy::Policy;
use crate::run::{RunConfig, RunDir};
use crate::script::repl::{Repl, ReplHost};
use crate::script::{Context as ScriptContext, Limits, Log, Schedule, ScriptSet};

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
}

/// A REPL session on a loaded model: the policy (trainable), scripts and run folder.
pub fn open(o: Options) -> anyhow::Result<Repl> {
    let models = crate::reward::models::LazyModels::new(Default::default(), o.device.clone());
    let mut scripts = ScriptSet::new(Limits::default(), o.log.clone()).with_models(models);
    let reward = Arc::new(scripts.load_reward(&o.reward)?);
    let prompts = scripts.load_prompts(&o.prompts)?;
    let hooks = o.hooks.as_deref().map(|p| scripts.load_hooks(p)).transpose()?;
    let mut policy = Policy::load_trainable(&o.model, &o.device)?;
    policy.set_clip_sample(false); // as `ddpo train`: DDPO trains the unclamped policy
    let train = TrainConfig { seed: o.seed, ..TrainConfig::default() };
    let (schedule, prompts) = Schedule::new(hooks, Some(reward.clone()), &train, Box::new(prompts));
    let config = RunConfig {
        train: train.clone(),
        model: o.model.clone(),
        reward: o.reward.display().to_string(),
        prompts: Vec::new(),
        epochs: 0,
        checkpoint_every: 1,
        lora: None,
        dtype: Default::default(),
        reward_models: Default::default(),
        clip_sample: Some(false),
    };
    let run = RunDir::create(&o.run_dir, &config)?;
    let reward_dyn: Arc<dyn crate::reward::Reward> = reward.clone();
    let trainer = Trainer::new(train, policy, reward_dyn, prompts)?;
    let state = State { trainer, scripts, schedule, run, samples: 0, history: ScriptContext::default() };
    let host = ModelHost { state: Mutex::new(state), interrupt: o.interrupt };
    Ok(Repl::new(Arc::new(host), Some(reward), o.run_dir))
}

struct State {
    trainer: Trainer,
    scripts: ScriptSet,
    schedule: Schedule,
    run: RunDir,
    /// Images sampled so far (each `sample` call draws fresh noise from the seed).
    samples: u64,
    /// Reward mean and std of each epoch trained (for scripts' `context()`).
    history: ScriptContext,
}

/// The model side of the REPL.
pub struct ModelHost {
    state: Mutex<State>,
    interrupt: Arc<AtomicBool>,
}

impl ReplHost for ModelHost {
    fn sample(&self, prompt: &str, n: usize) -> anyhow::Result<Vec<RgbImage>> {
        anyhow::ensure!(!prompt.trim().is_empty(), "sample(): the prompt is empty");
        let mut s = self.state.lock().unwrap();
        let seed = s.trainer.config.seed.wrapping_mul(1_000_003).wrapping_add(s.samples);
        s.samples += n as u64;
        let prompts = vec![prompt.to_string(); n];
        let cfg = &s.trainer.config;
        crate::pretrain::eval::sample_images(&s.trainer.policy, &prompts, &cfg.sampler, seed, cfg.sample_batch_size)
    }

    fn train(&self, epochs: usize) -> anyhow::Result<String> {
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        let mut out = String::new();
        s.schedule.epochs = s.trainer.epoch + epochs;
        // A Ctrl-C from before this call (e.g. during sample()) is not meant for it.
        self.interrupt.store(false, Ordering::SeqCst);
        for _ in 0..epochs {
            for r in s.scripts.reload() {
                out.push_str(&format!("{r}\n"));
            }
            s.history.epoch = s.trainer.epoch;
            s.history.step = s.trainer.opt.step_count();
            s.scripts.set_context(s.history.clone());
            s.scripts.save_versions(&s.run.dir.join("scripts"))?;
            let start = s.schedule.epoch_start(&mut s.trainer, &s.history);
            out.extend(super::schedule::error_line(&start).map(|l| l + "\n"));
            if start.stop {
                out.push_str(&format!("stopped by the hooks before epoch {}\n", s.trainer.epoch));
                break;
            }
            // A failing script leaves the policy untouched: the error ends train(), not the session.
            let report = s.trainer.run_epoch().map_err(|e| anyhow::anyhow!("{out}{e:#}"))?;
            let m = s.run.record(&report, super::schedule::record_extra(&s.scripts, &s.schedule, &start))?;
            s.history.reward_mean.push(m["reward_mean"].as_f64().unwrap_or(f64::NAN));
            s.history.reward_std.push(m["reward_std"].as_f64().unwrap_or(f64::NAN));
            out.push_str(&format!(
                "epoch {:>3}  reward {:+.4} ± {:.4}  loss {:+.2e}  {:.1}s{}\n",
                report.epoch,
                m["reward_mean"].as_f64().unwrap_or(f64::NAN),
                m["reward_std"].as_f64().unwrap_or(f64::NAN),
                report.loss,
                report.seconds_sampling + report.seconds_reward + report.seconds_training,
                super::schedule::log_suffix(&start)
            ));
            let ended = ScriptContext { epoch: report.epoch, step: s.trainer.opt.step_count(), ..s.history.clone() };
            let end = s.schedule.epoch_end(&s.trainer, &ended, &m);
            out.extend(super::schedule::error_line(&end).map(|l| l + "\n"));
            if end.stop {
                out.push_str(&format!("stopped by the hooks after epoch {}\n", report.epoch));
                break;
            }
            if self.interrupt.swap(false, Ordering::SeqCst) {
                out.push_str(&format!("interrupted: stopped after epoch {}\n", report.epoch));
                break;
            }
        }
        s.run.save_checkpoint(&s.trainer)?;
        out.push_str(&format!("checkpoint: {}\n", s.run.policy_path().display()));
        Ok(out)
    }

    fn reload(&self) -> anyhow::Result<String> {
        let reloads = self.state.lock().unwrap().scripts.reload();
        Ok(if reloads.is_empty() { "no script changed\n".into() } else { reloads.iter().map(|r| format!("{r}\n")).collect() })
    }

    fn set(&self, key: &str, value: f64) -> anyhow::Result<()> {
        let mut s = self.state.lock().unwrap();
        let mut c = s.trainer.config.clone();
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
        c.validate().with_context(|| format!("set({key:?}, {value})"))?;
        c.sampler.validate(s.trainer.policy.schedule.num_train_timesteps()).with_context(|| format!("set({key:?}, {value})"))?;
        c.trained_steps(&s.trainer.policy.schedule).with_context(|| format!("set({key:?}, {value})"))?;
        s.trainer.opt.config.lr = c.optimizer.lr;
        s.trainer.config = c;
        Ok(())
    }

    fn options(&self) -> Vec<(String, f64)> {
        let c = self.state.lock().unwrap().trainer.config.clone();
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
        log: crate::script::engine::stderr_log(),
        interrupt: interrupt.clone(),
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
