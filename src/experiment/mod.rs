//! `ddpo experiment`: the runs an experiment script declares ([`crate::script::experiment`]),
//! one after another into `<root>/<name>/<run>/`, each an ordinary run folder. A finished run is
//! skipped and an interrupted one resumed, so a killed experiment continues where it stopped;
//! the table and the curves ([`report`]) are read from the run folders alone, so two researchers
//! who share the scripts get the same table.

pub mod report;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::eval::paired::PairedReport;
use crate::run::RunConfig;
use crate::script::experiment::{ExperimentSpec, RunSpec};
use crate::script::Log;
use crate::session::{Ended, Observer, ScriptPaths, Session};

/// Written into a run folder when the run is finished (its training and its paired evaluation).
pub const RESULT_FILE: &str = "experiment.json";

/// The noise seed of every paired evaluation: the same for every run and both models.
const PAIRED_SEED: u64 = 0xA1BED;

/// What a finished run adds to its folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub paired: Option<PairedReport>,
}

/// Builds a run's settings from its options (the command line's flags, defaults and checks).
pub type Configure<'a> = &'a dyn Fn(&[(String, String)]) -> anyhow::Result<(RunConfig, ScriptPaths)>;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    New,
    /// Started (a run folder with a config) but not finished.
    Interrupted,
    Finished,
}

/// An experiment and the folder its runs go to.
pub struct Experiment {
    pub spec: ExperimentSpec,
    pub dir: PathBuf,
}

/// How [`Experiment::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every run finished.
    Done,
    /// Stopped (Ctrl-C) in this run; rerunning the experiment resumes it.
    Interrupted { run: String },
}

impl Experiment {
    pub fn new(spec: ExperimentSpec, root: &Path) -> Self {
        let dir = root.join(&spec.name);
        Self { spec, dir }
    }

    pub fn run_dir(&self, run: &RunSpec) -> PathBuf {
        self.dir.join(&run.name)
    }

    pub fn state(&self, run: &RunSpec) -> RunState {
        let dir = self.run_dir(run);
        if dir.join(RESULT_FILE).exists() {
            RunState::Finished
        } else if dir.join("config.json").exists() {
            RunState::Interrupted
        } else {
            RunState::New
        }
    }

    /// Every run's settings, built before any run starts so that a bad combination fails first;
    /// a started run whose settings the script no longer gives is refused.
    pub fn check(&self, configure: Configure) -> anyhow::Result<Vec<(RunConfig, ScriptPaths)>> {
        let file = self.spec.file.display();
        self.spec
            .runs()
            .iter()
            .map(|run| {
                let (config, paths) = configure(&run.options).with_context(|| format!("{file}: run {}", run.name))?;
                if self.state(run) != RunState::New {
                    let started = crate::run::RunDir::read_config(&self.run_dir(run))?;
                    anyhow::ensure!(
                        started.train == config.train && started.reward == config.reward && started.model == config.model,
                        "{file}: run {} was started with other settings than the script now gives; restore the script or remove {}",
                        run.name,
                        self.run_dir(run).display()
                    );
                }
                Ok((config, paths))
            })
            .collect()
    }

    /// Runs what is not finished, in order: new runs start, an interrupted one resumes; each
    /// finished run gets its paired evaluation and its result file.
    pub fn run(&self, configure: Configure, log: Log, device: &candle_core::Device, observer: &mut dyn Observer, stop: &AtomicBool) -> anyhow::Result<Outcome> {
        let configs = self.check(configure)?;
        let runs = self.spec.runs();
        for (i, (run, (config, paths))) in runs.iter().zip(configs).enumerate() {
            let dir = self.run_dir(run);
            let state = self.state(run);
            observer.line(&format!("[{}/{}] {}: {}", i + 1, runs.len(), run.name, match state {
                RunState::Finished => "finished, skipped",
                RunState::Interrupted => "resuming",
                RunState::New => "starting",
            }));
            if state == RunState::Finished {
                continue;
            }
            let mut session = match state {
                RunState::Interrupted => Session::resume(&dir, None, log.clone(), device)?,
                _ => Session::create(&dir, config, paths, log.clone(), device)?,
            };
            let plan = session.config().epochs;
            if let Ended::Interrupted { .. } = session.train(plan, observer, stop)? {
                return Ok(Outcome::Interrupted { run: run.name.clone() });
            }
            let paired = match &self.spec.paired {
                Some(p) => Some(session.paired_eval(p.prompts, p.per_prompt, PAIRED_SEED, p.script.as_deref())?),
                None => None,
            };
            let result = RunResult { paired };
            crate::io::write_atomic(&dir.join(RESULT_FILE), serde_json::to_string_pretty(&result)?.as_bytes())?;
        }
        Ok(Outcome::Done)
    }
}
