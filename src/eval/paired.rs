//! Paired before/after evaluation: the same prompts and the same sampler noise through the base
//! model and a finetuned one, scored by one reward, so the difference is the finetuning's alone
//! (the DDPO paper's comparison; what `benches/sweep/paired_eval.sh` did by hand).

use serde::{Deserialize, Serialize};

use crate::family::{Family, SamplerConfig};
use crate::reward::Reward;

/// The reward's mean on the same samples of both models.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedReport {
    pub before: f64,
    pub after: f64,
    /// Images scored per model.
    pub samples: usize,
}

impl PairedReport {
    /// after - before.
    pub fn change(&self) -> f64 {
        self.after - self.before
    }
}

/// Samples `per_prompt` images of each prompt from `base` and from `tuned` with the noise of
/// `seed` (the same for both) and scores them with `reward`.
pub fn paired(base: &dyn Family, tuned: &dyn Family, reward: &dyn Reward, prompts: &[String], per_prompt: usize, sampler: &SamplerConfig, seed: u64) -> anyhow::Result<PairedReport> {
    let texts: Vec<String> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), per_prompt)).collect();
    let mean = |family: &dyn Family| -> anyhow::Result<f64> {
        let images = crate::sampler::sample_images(family, &texts, sampler, seed, 32)?;
        let scores = reward.score(&images, &texts)?;
        crate::reward::check_finite(&scores, &texts, 0)?;
        Ok(scores.iter().map(|s| s.total).sum::<f64>() / scores.len().max(1) as f64)
    };
    Ok(PairedReport { before: mean(base)?, after: mean(tuned)?, samples: texts.len() })
}
