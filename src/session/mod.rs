//! A training session: the one owner of a run. It holds the trainer, the run's scripts and hooks
//! and its run folder, and runs epochs: script reloads at each boundary, hook contexts and
//! overrides, the epoch itself, its record, checkpoints, stopping (hooks, Ctrl-C, the plan's end)
//! and what to do when a script fails mid-epoch. `ddpo train` and the REPL's `train(n)` are thin
//! callers; what they show of it goes through an [`Observer`].

mod dist;
mod gold;
pub use gold::{summary as gold_summary, BASE_FILE as GOLD_BASE_FILE};
mod setup;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;

use crate::ddpo::{EpochReport, TrainConfig, Trainer};
use crate::run::{RunConfig, RunDir};
use crate::script::{Context as ScriptContext, HookOutcome, HookRunner, Log, Reload, ReloadOutcome, ScriptSet};

pub use setup::{open_model, Opener, ScriptPaths};

/// What happens when a script fails during an epoch (throws, returns a non-number, hits a
/// sandbox limit). The epoch's samples are dropped and the model is untouched in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnScriptError {
    /// Wait for a fixed version to be saved, then retry the epoch.
    Wait,
    /// Checkpoint and stop with an error that says how to resume.
    Exit,
    /// Return the error at once (the caller decides; the REPL reports it).
    Fail,
}

/// One finished epoch, as observers see it.
pub struct EpochLog<'a> {
    pub report: &'a EpochReport,
    /// Its `metrics.jsonl` record.
    pub metrics: &'a serde_json::Value,
    /// The hooks' outcome at the epoch's start.
    pub start: &'a HookOutcome,
    /// The scripts' content hashes in use (file name -> hash).
    pub scripts: std::collections::BTreeMap<String, String>,
    pub kl_weight: f64,
}

impl EpochLog<'_> {
    /// A number of the epoch's record (NaN when absent).
    pub fn metric(&self, key: &str) -> f64 {
        self.metrics[key].as_f64().unwrap_or(f64::NAN)
    }
}

/// What a session shows of itself: lines (reloads, hook errors, stops) and finished epochs.
pub trait Observer {
    fn line(&mut self, text: &str);
    fn epoch(&mut self, epoch: &EpochLog);
}

/// Why [`Session::train`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ended {
    /// The planned epochs are done.
    Done,
    /// The hooks asked to stop (before or after the epoch named).
    StoppedByHooks { epoch: usize, before: bool },
    /// The stop flag (Ctrl-C) was set; the epoch named was the last one run.
    Interrupted { epoch: usize },
    /// The training reward rose while the gold score fell (`stop_on_hack`); the best gold score
    /// was at `best_epoch`.
    Hacking { epoch: usize, best_epoch: Option<usize> },
    /// The suite's strict score fell below the model's before training by more than its noise,
    /// whatever the reward did (`stop_on_hack`).
    GoldFell { epoch: usize, best_epoch: Option<usize> },
}

/// An open training session.
pub struct Session {
    run: RunDir,
    config: RunConfig,
    trainer: Trainer,
    script_reward: Option<std::sync::Arc<crate::script::ScriptReward>>,
    scripts: ScriptSet,
    hooks: HookRunner,
    on_script_error: OnScriptError,
    resume_note: Option<String>,
    gold: Option<gold::GoldWatch>,
    /// The process group of a data-parallel run (one process by default); see [`Session::join`].
    dist: std::sync::Arc<dyn crate::dist::Collectives>,
    /// A rank other than 0: its private copy of rank 0's run, removed when the session ends.
    scratch: Option<PathBuf>,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Session {
    /// Starts a new run in `dir` on the model `config` names (a failed start leaves nothing
    /// behind to resume).
    pub fn create(dir: &Path, config: RunConfig, paths: ScriptPaths, log: Log, device: &candle_core::Device) -> anyhow::Result<Self> {
        Self::create_with(dir, config, paths, log, device, &|c, frozen| open_model(c, frozen, device))
    }

    /// As [`Session::create`], with the policy opened by `open` (any family).
    pub fn create_with(dir: &Path, config: RunConfig, paths: ScriptPaths, log: Log, device: &candle_core::Device, open: Opener) -> anyhow::Result<Self> {
        let run = RunDir::create(dir, &config)?;
        let parts = paths.save(&run.dir).and_then(|_| setup::load_parts(&config, &paths, log, device, open));
        match parts {
            Ok(parts) => Self::assemble(run, config, parts),
            Err(e) => {
                run.discard_unstarted();
                Err(e)
            }
        }
    }

    /// Reopens the run in `dir` at its last checkpoint; `epochs` changes its planned length.
    pub fn resume(dir: &Path, epochs: Option<usize>, log: Log, device: &candle_core::Device) -> anyhow::Result<Self> {
        Self::resume_with(dir, epochs, log, device, &|c, frozen| open_model(c, frozen, device))
    }

    /// As [`Session::resume`], with the policy opened by `open`.
    pub fn resume_with(dir: &Path, epochs: Option<usize>, log: Log, device: &candle_core::Device, open: Opener) -> anyhow::Result<Self> {
        let (mut run, mut config) = RunDir::open(dir)?;
        if let Some(epochs) = epochs.filter(|&e| e != config.epochs) {
            anyhow::ensure!(epochs > 0, "a run needs at least 1 epoch, got {epochs}");
            config.epochs = epochs;
            run.save_config(&config)?;
        }
        let paths = ScriptPaths::load(&run.dir)?;
        let mut parts = setup::load_parts(&config, &paths, log, device, open)?;
        let note = run.restore(&mut parts.trainer)?;
        // Settings changed by hooks in the kept epochs survive the restart.
        let mut settings = parts.trainer.config().clone();
        parts.hooks.replay(&mut settings, parts.trainer.policy(), &run.metrics_records());
        parts.trainer.reconfigure(settings)?;
        let mut session = Self::assemble(run, config, parts)?;
        session.resume_note = note;
        Ok(session)
    }

    /// What resuming had to do differently (a fallback checkpoint), to tell the user.
    pub fn resume_note(&self) -> Option<&str> {
        self.resume_note.as_deref()
    }

    fn assemble(run: RunDir, config: RunConfig, parts: setup::Parts) -> anyhow::Result<Self> {
        let setup::Parts { trainer, script_reward, scripts, hooks, gold_reward } = parts;
        let gold = config.eval.clone().map(|g| gold::GoldWatch::new(g, gold_reward, &run.metrics_records())).transpose()?;
        let dist = crate::dist::single();
        Ok(Self { run, config, trainer, script_reward, scripts, hooks, on_script_error: OnScriptError::Wait, resume_note: None, gold, dist, scratch: None })
    }

    /// A new run's gold score before its first update ([`gold::BASE_FILE`]), once: every later
    /// evaluation is read against it. Rank 0 alone, as every gold evaluation.
    fn evaluate_base(&mut self, observer: &mut dyn Observer) -> anyhow::Result<()> {
        let file = self.run.dir.join(gold::BASE_FILE);
        let Some(watch) = self.gold.as_mut() else { return Ok(()) };
        if self.trainer.epoch() > 0 || file.exists() {
            watch.read_base(&file);
            return Ok(());
        }
        let report = watch.evaluate(self.trainer.policy())?;
        crate::io::write_atomic(&file, serde_json::to_string_pretty(&gold::base_fields(&report))?.as_bytes())?;
        watch.set_base(&report);
        observer.line(&format!("gold before training {}", gold::summary(report.gold(), None, report.diversity, report.out_of_range)));
        Ok(())
    }

    /// Chooses what a script failing mid-epoch does (default: wait for a fix).
    pub fn on_script_error(mut self, policy: OnScriptError) -> Self {
        self.on_script_error = policy;
        self
    }

    /// The reward script, when the reward is one.
    pub fn script_reward(&self) -> Option<std::sync::Arc<crate::script::ScriptReward>> {
        self.script_reward.clone()
    }

    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// Reports sampling and training progress (see [`Trainer::set_progress`]).
    pub fn set_progress(&mut self, f: crate::ddpo::ProgressFn) {
        self.trainer.set_progress(f);
    }

    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    pub fn run_dir(&self) -> &Path {
        &self.run.dir
    }

    /// The weights of the latest checkpoint.
    pub fn policy_path(&self) -> PathBuf {
        self.run.policy_path()
    }

    /// Changes the training settings (validated; on error nothing changes).
    pub fn reconfigure(&mut self, settings: TrainConfig) -> anyhow::Result<()> {
        self.trainer.reconfigure(settings)
    }

    /// Picks up edited scripts now (a broken edit keeps the previous version).
    pub fn reload(&mut self) -> Vec<Reload> {
        self.scripts.reload()
    }

    /// The run's reward on `prompts` prompts (`per_prompt` samples each) of its prompt source,
    /// or of the prompt script `script`, through the base model and the policy as trained, with
    /// the same noise (`seed`) and the run's sampler.
    pub fn paired_eval(&mut self, prompts: usize, per_prompt: usize, seed: u64, script: Option<&Path>) -> anyhow::Result<crate::eval::paired::PairedReport> {
        let base = setup::open_model(&self.config, true, self.trainer.policy().device()).context("opening the base model for the paired evaluation")?;
        let prompts = match script {
            Some(path) => {
                let mut source = ScriptSet::new(crate::script::Limits::default(), std::sync::Arc::new(|_: &str| {})).load_prompts(path)?;
                let mut rng = crate::family::NoiseRng::new(seed);
                (0..prompts).map(|_| crate::ddpo::PromptSource::next_prompt(&mut source, rng.rng())).collect::<anyhow::Result<Vec<_>>>()?
            }
            None => self.trainer.draw_prompts(prompts, seed)?,
        };
        let sampler = self.trainer.config().sampler;
        crate::eval::paired::paired(base.as_ref(), self.trainer.policy(), self.trainer.reward(), &prompts, per_prompt, &sampler, seed)
    }

    /// Writes a checkpoint of the run as it is (rank 0 only: the ranks hold the same state).
    pub fn checkpoint(&self) -> anyhow::Result<()> {
        if !self.dist.is_root() {
            return Ok(());
        }
        self.run.save_checkpoint(&self.trainer)
    }

    /// Runs epochs until the run has `until` of them (the plan, or the current epoch plus n),
    /// checkpointing every `checkpoint_every` epochs, at `until` and when it stops. `stop` is
    /// polled between epochs.
    pub fn train(&mut self, until: usize, observer: &mut dyn Observer, stop: &AtomicBool) -> anyhow::Result<Ended> {
        self.hooks.epochs = until;
        self.evaluate_base(observer)?;
        while self.trainer.epoch() < until {
            self.boundary(observer)?;
            let context = self.script_context(self.trainer.epoch());
            self.scripts.set_context(context.clone());
            let mut settings = self.trainer.config().clone();
            let start = self.hooks.epoch_start(&mut settings, self.trainer.policy(), &context);
            self.trainer.reconfigure(settings)?;
            report_hook_error(&start, observer);
            if start.stop {
                self.checkpoint()?;
                return Ok(Ended::StoppedByHooks { epoch: self.trainer.epoch(), before: true });
            }
            let Some(report) = self.epoch_or_retry(observer, stop)? else { continue };
            let gold = match &self.gold {
                Some(g) if g.due(report.epoch) => Some(g.evaluate(self.trainer.policy())?),
                _ => None,
            };
            let metrics = self.record(&report, &start, gold.as_ref(), observer)?;
            let ended = gold.map(|g| self.judge_gold(report.epoch, &metrics, &g, observer)).transpose()?.flatten();
            // Rank 0 alone evaluates the gold score; its verdict holds for every rank.
            if let Some(ended) = crate::dist::broadcast_json(self.dist.as_ref(), ended)? {
                return Ok(ended);
            }
            let end = self.hooks.epoch_end(self.trainer.config(), &self.script_context(report.epoch), &metrics);
            report_hook_error(&end, observer);
            if end.stop {
                self.checkpoint()?;
                return Ok(Ended::StoppedByHooks { epoch: report.epoch, before: false });
            }
            let interrupted = crate::dist::broadcast_json(self.dist.as_ref(), stop.load(Ordering::SeqCst))?;
            let epoch = self.trainer.epoch();
            if epoch % self.config.checkpoint_every == 0 || epoch == until || interrupted {
                self.checkpoint()?;
            }
            if interrupted {
                return Ok(Ended::Interrupted { epoch: report.epoch });
            }
        }
        Ok(Ended::Done)
    }

    /// An epoch boundary: edited scripts are reloaded, and every version in use is kept in the
    /// run folder.
    fn boundary(&mut self, observer: &mut dyn Observer) -> anyhow::Result<()> {
        if self.scripts.is_empty() {
            return Ok(());
        }
        if self.dist.is_root() {
            for reload in self.scripts.reload() {
                observer.line(&reload.to_string());
            }
        }
        if self.dist.size() > 1 {
            self.sync_scripts()?;
        }
        self.scripts.save_versions(&self.run.dir.join("scripts"))
    }

    /// What scripts see of the run at `epoch`: the optimiser step and the finished epochs' rewards.
    fn script_context(&self, epoch: usize) -> ScriptContext {
        let (mean, std) = self.run.reward_curve();
        ScriptContext { epoch, step: self.trainer.optimizer_steps(), reward_mean: mean.to_vec(), reward_std: std.to_vec() }
    }

    /// Runs one epoch. A script error drops the epoch's samples and, by the session's policy,
    /// waits for a fix (`None`: retry the epoch), stops, or fails.
    fn epoch_or_retry(&mut self, observer: &mut dyn Observer, stop: &AtomicBool) -> anyhow::Result<Option<EpochReport>> {
        let e = match self.trainer.run_epoch() {
            Ok(report) => return Ok(Some(report)),
            // Several ranks stop together on any failure, rank 0 checkpointing: waiting for a
            // fixed script would need every rank to see the same fix at the same moment.
            Err(e) if self.dist.size() > 1 && crate::dist::failed_together(&e) => {
                self.checkpoint()?;
                return Err(e.context(format!("the run is checkpointed in {}", self.run.dir.display())));
            }
            Err(e) if is_script_error(&e) => e,
            Err(e) => {
                return Err(e.context(format!("the last checkpoint in {} is intact", self.run.dir.display())));
            }
        };
        let epoch = self.trainer.epoch();
        if self.on_script_error == OnScriptError::Fail {
            return Err(e);
        }
        observer.line(&format!("epoch {epoch} aborted, the model is untouched: {e:#}"));
        if self.on_script_error == OnScriptError::Wait && self.wait_for_fix(observer, stop) {
            return Ok(None);
        }
        self.checkpoint()?;
        anyhow::bail!("stopped at epoch {epoch} on a script error; the run is checkpointed in {}", self.run.dir.display())
    }

    /// Watches the scripts until a changed version compiles and passes its dry run (true), or
    /// `stop` is set (false). Failed versions are reported once each.
    fn wait_for_fix(&mut self, observer: &mut dyn Observer, stop: &AtomicBool) -> bool {
        observer.line("waiting for a fixed script: save it and the epoch is retried (Ctrl-C checkpoints and stops)");
        let mut shown = std::collections::HashSet::new();
        while !stop.load(Ordering::SeqCst) {
            let reloads = self.scripts.reload();
            for r in &reloads {
                if shown.insert(r.to_string()) {
                    observer.line(&r.to_string());
                }
            }
            if reloads.iter().any(|r| matches!(r.outcome, ReloadOutcome::Reloaded { .. })) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        false
    }

    /// Records a finished epoch in the run folder and shows it.
    fn record(&mut self, report: &EpochReport, start: &HookOutcome, gold: Option<&crate::eval::gold::GoldReport>, observer: &mut dyn Observer) -> anyhow::Result<serde_json::Value> {
        let scripts = self.scripts.hashes();
        self.run.record_script_hashes(report.epoch, &scripts)?;
        let mut extra = self.record_extra(start, &scripts);
        if let Some(g) = gold {
            let change = self.gold.as_ref().and_then(|w| w.change(g));
            crate::run::merge_json(&mut extra, gold::record_fields(g, change.as_ref()));
        }
        let metrics = self.run.record(report, extra)?;
        // Every rank's hooks see rank 0's record (the others differ in timings only).
        let metrics = crate::dist::broadcast_json(self.dist.as_ref(), metrics)?;
        let kl_weight = self.trainer.config().kl_weight;
        observer.epoch(&EpochLog { report, metrics: &metrics, start, scripts, kl_weight });
        Ok(metrics)
    }

    /// The extra fields of an epoch's `metrics.jsonl` record: script hashes, the overrides the
    /// hooks applied at its start (`hooks`), a hook error, and the reward weights in effect.
    fn record_extra(&self, start: &HookOutcome, scripts: &std::collections::BTreeMap<String, String>) -> serde_json::Value {
        let mut extra = serde_json::json!({ "scripts": scripts });
        if !start.applied.is_empty() {
            extra["hooks"] = start.applied.to_json();
        }
        if let Some(e) = &start.error {
            extra["hooks_error"] = e.clone().into();
        }
        let weights = self.hooks.weights();
        if !weights.is_empty() {
            extra["weights"] = serde_json::json!(weights);
        }
        extra
    }
}

impl Session {
    /// What the hacking monitor makes of an evaluation: keep the best checkpoint, say when the
    /// reward rises while the gold score falls or when the suite's score has fallen beyond its
    /// noise since training began, and (`stop_on_hack`) stop the run.
    fn judge_gold(&mut self, epoch: usize, metrics: &serde_json::Value, report: &crate::eval::gold::GoldReport, observer: &mut dyn Observer) -> anyhow::Result<Option<Ended>> {
        let Some(watch) = self.gold.as_mut() else { return Ok(None) };
        let reward = metrics["reward_mean"].as_f64().unwrap_or(f64::NAN);
        // The change was computed once, for the record (a bootstrap of 2,000 resamples).
        let fell = watch.fallen(metrics);
        let verdict = watch.judge(epoch, reward, report);
        let (keep_best, stop_on_hack, best_epoch) = (watch.config.keep_best, watch.config.stop_on_hack, watch.best_epoch());
        match verdict {
            crate::ddpo::monitor::Verdict::Best if keep_best => {
                let path = self.run.save_best(&self.trainer)?;
                observer.line(&format!("gold score {:.3} is the best so far: kept in {}", report.gold(), path.display()));
            }
            crate::ddpo::monitor::Verdict::Hacking { since_epoch, reward_gain, gold_loss } => {
                observer.line(&format!(
                    "reward hacking: since epoch {since_epoch} the reward rose by {reward_gain:.4} while the gold score fell by {gold_loss:.3}; the best gold score was after epoch {}",
                    best_epoch.map_or("?".into(), |e| e.to_string())
                ));
                if stop_on_hack {
                    self.checkpoint()?;
                    return Ok(Some(Ended::Hacking { epoch, best_epoch }));
                }
            }
            _ => {}
        }
        if let Some((change, low, high)) = fell {
            observer.line(&format!(
                "the model is losing what the gold score measures: the suite's strict score is {:+.1} points from before training (95% interval {:+.1} .. {:+.1}, below zero at two evaluations in a row); the best gold score was after epoch {}",
                100.0 * change,
                100.0 * low,
                100.0 * high,
                best_epoch.map_or("?".into(), |e| e.to_string())
            ));
            if stop_on_hack {
                self.checkpoint()?;
                return Ok(Some(Ended::GoldFell { epoch, best_epoch }));
            }
        }
        Ok(None)
    }
}

fn report_hook_error(outcome: &HookOutcome, observer: &mut dyn Observer) {
    if let Some(e) = &outcome.error {
        observer.line(&format!("{e} (hook failed: the previous settings stay)"));
    }
}

/// Whether an epoch failed because of a script (rather than, say, the model).
fn is_script_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<crate::script::ScriptError>().is_some())
}
