//! The session's gold evaluations: when they are due, what they found, and what the hacking
//! monitor makes of them (keep the best checkpoint, warn, stop).

use crate::ddpo::monitor::{Evaluation, HackMonitor, Verdict};
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
}

impl GoldWatch {
    /// Starts watching; a resumed run's earlier evaluations (its `metrics.jsonl` records) count.
    pub fn new(config: GoldConfig, reward: Option<ScriptReward>, records: &[serde_json::Value]) -> anyhow::Result<Self> {
        config.validate()?;
        anyhow::ensure!(config.reward.is_some() == reward.is_some(), "the gold reward script is configured but not loaded, or loaded but not configured");
        let mut monitor = HackMonitor::new(config.patience);
        for r in records {
            // Runs from before `eval/gold` watched the suite's strict score.
            let gold = r["eval/gold"].as_f64().or(r["eval/suite_strict"].as_f64());
            if let (Some(epoch), Some(reward), Some(gold)) = (r["epoch"].as_u64(), r["reward_mean"].as_f64(), gold) {
                monitor.observe(Evaluation { epoch: epoch as usize, reward, gold });
            }
        }
        Ok(Self { prompts: config.prompts()?, config, monitor, reward })
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

/// An evaluation in a log line after the word "gold": `G diversity D out O%` (no range for
/// latent families, whose out-of-range fraction is NaN).
pub fn summary(gold: f64, diversity: f64, out_of_range: f64) -> String {
    let range = if out_of_range.is_finite() { format!(" out {:.0}%", 100.0 * out_of_range) } else { String::new() };
    format!("{gold:.3} diversity {diversity:.3}{range}")
}

/// The `metrics.jsonl` fields of an evaluation.
pub(super) fn record_fields(r: &GoldReport) -> serde_json::Value {
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
    fields
}
