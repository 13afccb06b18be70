//! The session's gold evaluations: when they are due, what they found, and what the hacking
//! monitor makes of them (keep the best checkpoint, warn, stop).

use crate::ddpo::monitor::{Evaluation, HackMonitor, Verdict};
use crate::eval::compare::{paired_change, Change, Passes};
use crate::eval::gold::{evaluate, GoldConfig, GoldReport};
use crate::family::Family;
use crate::script::ScriptReward;
use crate::world::suite::SuitePrompt;

/// The run folder's file with the gold evaluation of the model before its first update: the
/// baseline the later evaluations are read against.
pub const BASE_FILE: &str = "gold-base.json";

/// The noise seed of every gold evaluation: the same starting noise each time, so the score
/// moves only with the model.
const SEED: u64 = 0x601D;

pub(super) struct GoldWatch {
    pub config: GoldConfig,
    prompts: Vec<SuitePrompt>,
    monitor: HackMonitor,
    /// The gold reward script (`GoldConfig::reward`), loaded.
    reward: Option<ScriptReward>,
    /// The evaluation before training's strict passes per prompt ([`BASE_FILE`]), when known.
    base: Option<Passes>,
    /// How many evaluations in a row found the strict score below the base beyond its interval.
    fallen_in_a_row: usize,
}

/// Evaluations in a row whose strict score is below the base beyond its interval before the run
/// says the model is getting worse: one such evaluation in twenty happens by chance.
const FALLEN_EVALUATIONS: usize = 2;

impl GoldWatch {
    /// Starts watching; a resumed run's earlier evaluations (its `metrics.jsonl` records) count.
    pub fn new(config: GoldConfig, reward: Option<ScriptReward>, records: &[serde_json::Value]) -> anyhow::Result<Self> {
        config.validate()?;
        anyhow::ensure!(config.reward.is_some() == reward.is_some(), "the gold reward script is configured but not loaded, or loaded but not configured");
        let monitor = HackMonitor::new(config.patience);
        let mut watch = Self { prompts: config.prompts()?, config, monitor, reward, base: None, fallen_in_a_row: 0 };
        for r in records {
            watch.fallen(r);
            // Runs from before `eval/gold` watched the suite's strict score.
            let gold = r["eval/gold"].as_f64().or(r["eval/suite_strict"].as_f64());
            if let (Some(epoch), Some(reward), Some(gold)) = (r["epoch"].as_u64(), r["reward_mean"].as_f64(), gold) {
                watch.monitor.observe(Evaluation { epoch: epoch as usize, reward, gold });
            }
        }
        Ok(watch)
    }

    /// Reads the evaluation before training from `file` ([`BASE_FILE`]), when it has the passes
    /// per prompt (files of older runs do not): later evaluations are then paired with it.
    pub fn read_base(&mut self, file: &std::path::Path) {
        let base = std::fs::read(file).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let passes: Option<Vec<usize>> = base.and_then(|v| serde_json::from_value(v[PASSES].clone()).ok());
        self.base = passes.filter(|p| p.len() == self.prompts.len()).map(|passes| Passes {
            categories: self.prompts.iter().map(|p| p.category).collect(),
            passes,
            per_prompt: self.config.per_prompt,
        });
    }

    /// Sets the evaluation before training.
    pub fn set_base(&mut self, report: &GoldReport) {
        self.base = Some(report.passes.clone());
    }

    /// The change of the strict score since the evaluation before training, with its 95%
    /// interval over prompts (both evaluations use the same noise, so they are paired).
    pub fn change(&self, report: &GoldReport) -> Option<Change> {
        paired_change(self.base.as_ref()?, &report.passes, SEED).ok().map(|c| c.overall)
    }

    /// Counts a `metrics.jsonl` record's evaluation (its strict change, as [`record_fields`]
    /// wrote it) and returns (change, low, high) when it and the evaluation before it both found
    /// the strict score below the base beyond its interval: the model is getting worse at what
    /// the gold score measures, whatever the reward does. Records without one change nothing.
    pub fn fallen(&mut self, record: &serde_json::Value) -> Option<(f64, f64, f64)> {
        let [change, low, high] = STRICT_CHANGE.map(|k| record[k].as_f64());
        let (change, low, high) = (change?, low?, high?);
        self.fallen_in_a_row = if high < 0.0 { self.fallen_in_a_row + 1 } else { 0 };
        (self.fallen_in_a_row >= FALLEN_EVALUATIONS).then_some((change, low, high))
    }

    /// Whether epoch `epoch` (0-based, just finished) ends with an evaluation.
    pub fn due(&self, epoch: usize) -> bool {
        (epoch + 1) % self.config.every == 0
    }

    pub fn evaluate(&self, family: &dyn Family) -> anyhow::Result<GoldReport> {
        let reward = self.reward.as_ref().map(|r| r as &dyn crate::reward::Reward);
        evaluate(family, &self.prompts, self.config.per_prompt, &family.eval_sampler(), SEED, reward)
    }

    /// The monitor's verdict on an evaluation after the epoch whose mean reward is `reward`.
    pub fn judge(&mut self, epoch: usize, reward: f64, report: &GoldReport) -> Verdict {
        self.monitor.observe(Evaluation { epoch, reward, gold: report.gold() })
    }

    /// The epoch of the best gold score so far.
    pub fn best_epoch(&self) -> Option<usize> {
        self.monitor.best().map(|e| e.epoch)
    }
}

/// The gold-base file's field with the strict passes per prompt.
const PASSES: &str = "eval/passes";

/// The record fields of the strict score's change since before training and its interval.
const STRICT_CHANGE: [&str; 3] = ["eval/strict_change", "eval/strict_change_low", "eval/strict_change_high"];

/// An evaluation in a log line after the word "gold": `G diversity D out O%` (no range for
/// latent families, whose out-of-range fraction is NaN), and where the run knows its evaluation
/// before training, the strict score's change since then with its 95% interval, in points:
/// `G (strict +1.8, -2.1 .. +5.6) diversity ...`.
pub fn summary(gold: f64, change: Option<(f64, f64, f64)>, diversity: f64, out_of_range: f64) -> String {
    let range = if out_of_range.is_finite() { format!(" out {:.0}%", 100.0 * out_of_range) } else { String::new() };
    let change = change.map_or(String::new(), |(c, low, high)| format!(" (strict {:+.1}, {:+.1} .. {:+.1})", 100.0 * c, 100.0 * low, 100.0 * high));
    format!("{gold:.3}{change} diversity {diversity:.3}{range}")
}

/// The gold-base file: the evaluation's fields and its passes per prompt.
pub(super) fn base_fields(r: &GoldReport) -> serde_json::Value {
    let mut fields = record_fields(r, None);
    fields[PASSES] = serde_json::json!(r.passes.passes);
    fields
}

/// The `metrics.jsonl` fields of an evaluation, with its change since the evaluation before
/// training where known (`eval/strict_change` and its interval, `_low` / `_high`).
pub(super) fn record_fields(r: &GoldReport, change: Option<&Change>) -> serde_json::Value {
    let mut fields = serde_json::json!({
        "eval/gold": r.gold(),
        "eval/suite_strict": r.suite_strict,
        "eval/suite_partial": r.suite_partial,
        "eval/diversity": r.diversity,
        "eval/out_of_range": r.out_of_range,
    });
    if let Some(reward) = r.reward {
        fields["eval/reward"] = serde_json::json!(reward);
    }
    if let Some(c) = change {
        for (key, value) in STRICT_CHANGE.into_iter().zip([c.change, c.low, c.high]) {
            fields[key] = serde_json::json!(value);
        }
    }
    fields
}
