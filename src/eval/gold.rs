//! The gold score of a training run: a held-out slice of the compositional suite, sampled with
//! fixed noise and scored by its detector (never the training reward), plus the samples' diversity
//! and how much of them leaves the pixel range. A run evaluates it every few epochs to notice a
//! reward that rises while the images go to nothing.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::compare::Passes;
use super::suite::{score_suite, select, SuiteOptions};
use crate::family::{Family, SamplerConfig};
use crate::reward::Reward;
use anyhow::Context;
use crate::world::suite::{suite, Half, SuitePrompt, LATEST};

/// What a run's gold evaluation samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldConfig {
    /// Epochs between evaluations.
    pub every: usize,
    /// Held-out suite prompts, spread over its categories.
    pub prompts: usize,
    /// Samples per prompt (at least 2, for the diversity).
    pub per_prompt: usize,
    /// Evaluations over which a rising reward with a falling gold score counts as hacking.
    pub patience: usize,
    /// Keep the checkpoint with the best gold score in `best/`.
    #[serde(default)]
    pub keep_best: bool,
    /// Stop the run when it hacks the reward.
    #[serde(default)]
    pub stop_on_hack: bool,
    /// A reward script that is the gold score instead of the suite's strict score (scored on the
    /// same held-out samples; the suite's figures are still logged).
    #[serde(default)]
    pub reward: Option<std::path::PathBuf>,
}

/// One evaluation's figures (logged as `eval/<name>`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GoldReport {
    /// The suite's strict score (mean over its categories).
    pub suite_strict: f64,
    pub suite_partial: f64,
    /// Mean RMS distance in 0..1 pixel units between samples of the same prompt.
    pub diversity: f64,
    /// Fraction of final sample values outside the pixel range (NaN for latent families).
    pub out_of_range: f64,
    /// Mean of the gold reward script over the samples, when the run has one.
    pub reward: Option<f64>,
    /// Samples with every clause right, per prompt: what pairs two evaluations (the same
    /// prompts and noise) for the interval of their difference.
    pub passes: Passes,
}

impl GoldReport {
    /// The score the monitor watches: the gold reward script's mean where there is one, else
    /// the suite's strict score.
    pub fn gold(&self) -> f64 {
        self.reward.unwrap_or(self.suite_strict)
    }
}

impl GoldConfig {
    pub fn validate(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::ensure;
        ensure(self.every > 0, "eval.every", || "must be at least 1".into())?;
        ensure(self.prompts > 0, "eval.prompts", || "must be at least 1".into())?;
        ensure(self.per_prompt >= 2, "eval.per_prompt", || "must be at least 2 (diversity compares samples of a prompt)".into())?;
        ensure(self.patience > 0, "eval.patience", || "must be at least 1".into())
    }

    /// The held-out prompts it samples: every k-th of the suite's held-out half.
    pub fn prompts(&self) -> anyhow::Result<Vec<SuitePrompt>> {
        let heldout = select(&suite(LATEST)?, Some(Half::Heldout));
        let stride = (heldout.len() / self.prompts).max(1);
        Ok(heldout.into_iter().step_by(stride).take(self.prompts).collect())
    }
}

/// Samples the held-out prompts with fixed noise (`seed`) and scores them with the suite's
/// detector and, where given, a gold `reward`.
pub fn evaluate(family: &dyn Family, prompts: &[SuitePrompt], per_prompt: usize, sampler: &SamplerConfig, seed: u64, reward: Option<&dyn Reward>) -> anyhow::Result<GoldReport> {
    let texts: Vec<String> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.text.clone(), per_prompt)).collect();
    let (images, out_of_range) = crate::sampler::sample_images_with_range(family, &texts, sampler, seed, 32)?;
    let diversity = diversity(&images, per_prompt)?;
    let reward = match reward {
        Some(r) => {
            let scores = r.score(&images, &texts).with_context(|| format!("gold reward {}", r.name()))?;
            crate::reward::check_finite(&scores, &texts, 0)?;
            Some(scores.iter().map(|s| s.total).sum::<f64>() / scores.len().max(1) as f64)
        }
        None => None,
    };
    let opts = SuiteOptions { suite: LATEST.to_string(), half: Some(Half::Heldout), per_prompt, seed, sampler: *sampler };
    let run = score_suite(prompts.to_vec(), images, &opts);
    Ok(GoldReport { suite_strict: run.report.strict, suite_partial: run.report.partial, diversity, out_of_range, reward, passes: Passes::of_run(&run) })
}

/// Mean over prompts of the mean pairwise RMS distance between their samples (0..1 units).
fn diversity(images: &[image::RgbImage], per_prompt: usize) -> anyhow::Result<f64> {
    let (mut sum, mut pairs) = (0.0, 0usize);
    for group in images.chunks(per_prompt) {
        let t: Vec<Tensor> = group.iter().map(|img| Tensor::from_vec(img.as_raw().iter().map(|&v| v as f32 / 255.0).collect::<Vec<_>>(), img.as_raw().len(), &candle_core::Device::Cpu)).collect::<candle_core::Result<_>>()?;
        for i in 0..t.len() {
            for j in i + 1..t.len() {
                sum += (&t[i] - &t[j])?.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt() as f64;
                pairs += 1;
            }
        }
    }
    Ok(sum / pairs.max(1) as f64)
}
