//! Advantages from rewards: per-prompt normalisation with a stat tracker (the DDPO reference's
//! `PerPromptStatTracker`), or normalisation over the whole batch; then clipping.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// How rewards become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Normalisation {
    /// Per prompt over its last `buffer_size` rewards, once it has `min_count` of them;
    /// prompts seen less often fall back to the batch statistics.
    PerPrompt { buffer_size: usize, min_count: usize },
    /// Over the current batch.
    Batch,
}

/// Reward history per prompt; saved in checkpoints so a resumed run normalises identically.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatTracker {
    history: BTreeMap<String, VecDeque<f64>>,
}

fn mean_std<'a>(values: impl Iterator<Item = &'a f64> + Clone) -> (f64, f64) {
    let n = values.clone().count().max(1) as f64;
    let mean = values.clone().sum::<f64>() / n;
    let var = values.map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

impl StatTracker {
    /// Records `rewards` and returns their advantages (r - mean) / (std + 1e-6).
    pub fn advantages(&mut self, prompts: &[String], rewards: &[f64], how: Normalisation) -> Vec<f64> {
        let batch = mean_std(rewards.iter());
        let Normalisation::PerPrompt { buffer_size, min_count } = how else {
            return rewards.iter().map(|r| (r - batch.0) / (batch.1 + 1e-6)).collect();
        };
        let mut stats_for = BTreeMap::new();
        for prompt in prompts.iter().collect::<std::collections::BTreeSet<_>>() {
            let hist = self.history.entry(prompt.clone()).or_default();
            for (p, r) in prompts.iter().zip(rewards) {
                if p == prompt {
                    hist.push_back(*r);
                    if hist.len() > buffer_size {
                        hist.pop_front();
                    }
                }
            }
            let stats = if hist.len() < min_count { batch } else { mean_std(hist.iter()) };
            stats_for.insert(prompt.clone(), stats);
        }
        prompts
            .iter()
            .zip(rewards)
            .map(|(p, r)| {
                let (mean, std) = stats_for[p];
                (r - mean) / (std + 1e-6)
            })
            .collect()
    }
}
