//! The run folder of `ddpo train`: the config used, `metrics.jsonl` (one JSON object per epoch),
//! `samples/epoch_NNNN.png`, `reward.png`, and a checkpoint that resumes the same run.
//!
//! A checkpoint is a folder written whole and then swapped in by renames, so a crash at any
//! moment leaves either the previous checkpoint or the new one, never a mix; the one before it
//! is kept as a fallback ([`checkpoint`]). A run folder is locked while a process has it open.

mod checkpoint;
mod curves;
mod lock;
mod model;

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::ddpo::{component_means, EpochReport, TrainConfig};
use crate::io::write_atomic;

pub use model::{resolve_model, ModelSource};

/// What a run was started with (saved as `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub train: TrainConfig,
    /// The model the run started from.
    pub model: PathBuf,
    /// The reward: a built-in's name or a script's path.
    pub reward: RewardSpec,
    pub prompts: Vec<String>,
    pub epochs: usize,
    pub checkpoint_every: usize,
    /// Processes training it data-parallel (`mpirun -np`); a resume needs as many.
    #[serde(default = "one_rank")]
    pub ranks: usize,
    /// Train LoRA adapters instead of all weights.
    #[serde(default)]
    pub lora: Option<crate::model::LoraConfig>,
    /// The dtype of frozen weights (diffusers folders only).
    #[serde(default)]
    pub dtype: crate::family::WeightDtype,
    /// The CLIP and aesthetic models behind the script primitives (`None`: the shipped ones).
    #[serde(default)]
    pub reward_models: crate::reward::models::ModelPaths,
    /// Overrides the model's x0 clamp in the sampler (`None`: the model's own setting).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// The gold evaluation every few epochs (`None`: none).
    #[serde(default)]
    pub eval: Option<crate::eval::gold::GoldConfig>,
}

/// What a run optimises: a built-in reward by name, or a reward script (a path ending in
/// `.rhai`). Saved in `config.json` as that one string.
fn one_rank() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RewardSpec {
    Builtin(String),
    Script(PathBuf),
}

impl From<String> for RewardSpec {
    fn from(s: String) -> Self {
        if s.ends_with(".rhai") {
            RewardSpec::Script(PathBuf::from(s))
        } else {
            RewardSpec::Builtin(s)
        }
    }
}

impl From<RewardSpec> for String {
    fn from(r: RewardSpec) -> Self {
        r.to_string()
    }
}

impl std::fmt::Display for RewardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RewardSpec::Builtin(name) => f.write_str(name),
            RewardSpec::Script(path) => write!(f, "{}", path.display()),
        }
    }
}

/// An open run folder, locked against a second process for as long as it is open.
pub struct RunDir {
    pub dir: PathBuf,
    curves: curves::RunCurves,
    _lock: lock::RunLock,
}

impl RunDir {
    /// Creates a fresh run folder (refusing one that already holds a run).
    pub fn create(dir: &Path, config: &RunConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !dir.join("config.json").exists(),
            "{} already holds a run: use --resume {} to continue it, or choose another --run-dir",
            dir.display(),
            dir.display()
        );
        std::fs::create_dir_all(dir.join("samples")).with_context(|| format!("cannot create run folder {}", dir.display()))?;
        let _lock = lock::RunLock::acquire(dir)?;
        let run = Self { dir: dir.to_path_buf(), curves: Default::default(), _lock };
        run.save_config(config)?;
        Ok(run)
    }

    /// Writes `config.json` (atomically), e.g. when a resumed run changes its planned epochs.
    pub fn save_config(&self, config: &RunConfig) -> anyhow::Result<()> {
        write_atomic(&self.dir.join("config.json"), serde_json::to_string_pretty(config)?.as_bytes())
    }

    /// Removes what starting a run wrote into its folder (config, scripts, empty samples folder,
    /// the folder itself if then empty) when no epoch finished, so that a failed start leaves
    /// nothing to `--resume`; any other file in the folder is kept.
    pub fn discard_unstarted(&self) {
        if self.dir.join("metrics.jsonl").exists() {
            return;
        }
        let _ = std::fs::remove_file(self.dir.join("config.json"));
        let _ = std::fs::remove_file(self.dir.join(lock::LOCK_FILE));
        let _ = std::fs::remove_dir_all(self.dir.join("scripts"));
        let _ = std::fs::remove_dir(self.dir.join("samples"));
        let _ = std::fs::remove_dir(&self.dir);
    }

    /// Reward mean and std of the epochs recorded so far.
    pub fn reward_curve(&self) -> (&[f64], &[f64]) {
        (&self.curves.reward_mean, &self.curves.reward_std)
    }

    /// The records of `metrics.jsonl`, oldest first.
    pub fn metrics_records(&self) -> Vec<serde_json::Value> {
        read_records(&self.dir)
    }

    /// Appends the epoch's script hashes to `scripts/epochs.jsonl` (the versions themselves are
    /// `scripts/<name>.<hash>.rhai`).
    pub fn record_script_hashes(&self, epoch: usize, hashes: &std::collections::BTreeMap<String, String>) -> anyhow::Result<()> {
        if hashes.is_empty() {
            return Ok(());
        }
        let line = serde_json::json!({ "epoch": epoch, "scripts": hashes });
        crate::io::append_line(&self.dir.join("scripts/epochs.jsonl"), &line.to_string())
    }

    /// The config of the run in `dir`, read without opening (or locking) the run.
    pub fn read_config(dir: &Path) -> anyhow::Result<RunConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{} is not a run folder (no config.json)", dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    /// Opens an existing run folder and its config.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, RunConfig)> {
        let config = Self::read_config(dir)?;
        let _lock = lock::RunLock::acquire(dir)?;
        let mut run = Self { dir: dir.to_path_buf(), curves: Default::default(), _lock };
        run.reload_curve()?;
        Ok((run, config))
    }

    /// Reads the recorded epochs back. A last line with no newline that does not parse is an
    /// append cut short by a kill: it is skipped here and dropped when the run is truncated to
    /// its checkpoint. Any other line that does not parse is damage, named by its line number.
    fn reload_curve(&mut self) -> anyhow::Result<()> {
        self.curves = Default::default();
        let path = self.dir.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let torn_tail = !text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(record) => self.curves.push(&record),
                Err(_) if torn_tail && i + 1 == lines.len() => {}
                Err(e) => anyhow::bail!("{} line {} is corrupt ({e}): remove the run folder or that line to go on", path.display(), i + 1),
            }
        }
        Ok(())
    }

    /// Appends the epoch's metrics (plus the fields of `extra`, e.g. script hashes), writes its
    /// sample grid and redraws the reward curve.
    pub fn record(&mut self, r: &EpochReport, extra: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let rewards = r.rewards();
        let n = rewards.len().max(1) as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let std = (rewards.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        let mut m = serde_json::json!({
            "epoch": r.epoch,
            "reward_mean": mean,
            "reward_std": std,
            "reward_min": rewards.iter().cloned().fold(f64::INFINITY, f64::min),
            "reward_max": rewards.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            "loss": r.loss,
            "approx_kl": r.approx_kl,
            "clipfrac": r.clipfrac,
            "clipfrac_high": r.clipfrac_high,
            "clipfrac_low": r.clipfrac_low,
            // NaN (a step not trained) is written as null.
            "ratio_by_step": r.ratio_by_step.iter().map(|&v| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null }).collect::<Vec<_>>(),
            "x0_excess": r.x0_excess,
            "kl_base": r.kl_base,
            "out_of_range": r.out_of_range,
            "zero_std_ratio": r.zero_std_ratio,
            "lr": r.lr,
            "optimizer_steps": r.optimizer_steps,
            "grad_norm": r.grad_norm,
            "seconds_sampling": r.seconds_sampling,
            "seconds_reward": r.seconds_reward,
            "seconds_training": r.seconds_training,
        });
        // Resident memory after each epoch, so a leak shows in the run's own log.
        if let (Ok(rss), Ok(peak)) = (crate::io::memory_mb("VmRSS"), crate::io::peak_rss_mb()) {
            m["rss_mb"] = serde_json::json!(rss);
            m["peak_rss_mb"] = serde_json::json!(peak);
        }
        for (k, v) in component_means(&r.scores) {
            m[k] = serde_json::json!(v);
        }
        merge_json(&mut m, extra);
        crate::io::append_line(&self.dir.join("metrics.jsonl"), &m.to_string())?;
        self.write_grid(r)?;
        self.curves.push(&m);
        crate::render::save_png(&self.curves.draw(), &self.dir.join("reward.png"))?;
        Ok(m)
    }

    fn write_grid(&self, r: &EpochReport) -> anyhow::Result<()> {
        if r.images.is_empty() {
            return Ok(()); // a data-parallel rank other than 0 keeps no images
        }
        let shown = r.images.len().min(16);
        let labels: Vec<String> = (0..shown).map(|i| format!("{:.3} {}", r.scores[i].total, r.prompts[i])).collect();
        let grid = crate::render::labelled_grid(&r.images[..shown], &labels, 4, 3);
        crate::render::save_png(&grid, &self.dir.join("samples").join(format!("epoch_{:04}.png", r.epoch)))
    }

    pub(crate) fn truncate_metrics(&self, epochs: usize) -> anyhow::Result<()> {
        let path = self.dir.join("metrics.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).take(epochs).collect();
        write_atomic(&path, (kept.join("\n") + if kept.is_empty() { "" } else { "\n" }).as_bytes())
    }
}

/// The `metrics.jsonl` records of the run in `dir` (none when it has no epochs yet), read
/// without opening the run.
pub fn read_records(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Copies the fields of the JSON object `extra` into the object `into` (overwriting).
pub fn merge_json(into: &mut serde_json::Value, extra: serde_json::Value) {
    if let serde_json::Value::Object(fields) = extra {
        for (k, v) in fields {
            into[k] = v;
        }
    }
}
