//! Advantages from rewards: per-prompt normalisation with a stat tracker (the DDPO reference's
//! `PerPromptStatTracker`), over the whole batch, or within groups of samples of one prompt
//! (GRPO); then clipping.

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
    /// Within each group of consecutive samples of one prompt (group-relative, as GRPO): the
    /// group's mean, and its standard deviation or (`global_std`) the whole batch's.
    Group { global_std: bool },
}

impl Normalisation {
    /// The reference's per-prompt statistics: the last 32 rewards of a prompt, once it has 4.
    pub const PER_PROMPT: (usize, usize) = (32, 4);
}

/// Group-relative advantages and how many groups carried no signal.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    pub advantages: Vec<f64>,
    /// Groups whose rewards were all equal: their advantages are 0, so they add nothing to the
    /// loss.
    pub zero_std_groups: usize,
    pub groups: usize,
}

impl GroupAdvantages {
    /// The share of groups without signal (0 with no groups).
    pub fn zero_std_ratio(&self) -> f64 {
        self.zero_std_groups as f64 / self.groups.max(1) as f64
    }
}

/// (r - mean of its group) / (std + 1e-6) over consecutive groups of `group_size` rewards, the std
/// of the group or (`global_std`) of the whole batch; a group of equal rewards gets 0.
pub fn group_advantages(rewards: &[f64], group_size: usize, global_std: bool) -> GroupAdvantages {
    let batch_std = mean_std(rewards.iter()).1;
    let mut out = GroupAdvantages { advantages: Vec::with_capacity(rewards.len()), zero_std_groups: 0, groups: 0 };
    for group in rewards.chunks(group_size.max(1)) {
        let (mean, std) = mean_std(group.iter());
        out.groups += 1;
        if std < 1e-12 {
            out.zero_std_groups += 1;
            out.advantages.extend(group.iter().map(|_| 0.0));
            continue;
        }
        let scale = if global_std { batch_std } else { std };
        out.advantages.extend(group.iter().map(|r| (r - mean) / (scale + 1e-6)));
    }
    out
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
    /// Records `rewards` and returns their advantages (r - mean) / (std + 1e-6); for group
    /// normalisation see [`group_advantages`].
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
