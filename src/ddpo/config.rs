//! DDPO's hyper-parameters ([`TrainConfig`]), validated once. Errors name the field and the
//! value ([`ConfigError`]).

use serde::{Deserialize, Serialize};

use super::advantage::Normalisation;
pub use crate::error::ConfigError;
use crate::error::ensure;
use crate::family::{Family, SamplerConfig};
use crate::optim::AdamWConfig;

/// The policy-gradient estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Importance sampling with PPO clipping (several updates per batch).
    Is,
    /// Score function (REINFORCE): one gradient step per sampled batch.
    Sf,
    /// Reward-weighted regression on the denoising loss (the paper's baseline).
    Rwr,
}

/// Every DDPO hyper-parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub algorithm: Algorithm,
    pub samples_per_epoch: usize,
    pub sample_batch_size: usize,
    pub train_batch_size: usize,
    pub inner_epochs: usize,
    /// Minibatches whose gradients are summed before one optimiser step.
    pub grad_accum: usize,
    /// Fraction of each trajectory's steps trained on (a random subset per sample).
    pub timestep_fraction: f64,
    pub clip_range: f64,
    pub adv_clip: f64,
    pub normalisation: Normalisation,
    pub rwr_beta: f64,
    pub optimizer: AdamWConfig,
    pub grad_clip: f64,
    pub sampler: SamplerConfig,
    pub reward_workers: usize,
    pub seed: u64,
    /// Steps whose policy noise sigma is below this are left out of the DDPO-IS / SF loss: a
    /// nearly deterministic step's score term carries a 1/sigma weight and is mostly noise.
    /// 0 keeps every step, as the reference.
    #[serde(default)]
    pub min_train_sigma: f64,
    /// Also train the text encoder (off, as in the DDPO reference: the reward shapes the images).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// Train only the weights whose name contains one of these; empty trains them all.
    #[serde(default)]
    pub train_only: Vec<String>,
    /// Weight of `alpha_bar_t * mean(relu(|x0| - 1)^2)`, a penalty on predicted clean pixels
    /// leaving their range, weighted so that the late steps, whose x0 is the image, count most.
    /// Pixel-space families only.
    #[serde(default)]
    pub range_penalty: f64,
    /// Weight of the closed-form KL of each trained step's Gaussian to the base model's (DPOK's
    /// regulariser): changes the reward does not pay for are pulled back.
    #[serde(default)]
    pub kl_weight: f64,
    /// Samples of each prompt per epoch, consecutive in the batch (GRPO's group; 1: every sample
    /// draws its own prompt).
    #[serde(default = "one")]
    pub group_size: usize,
    /// A group starts from one x_T (DanceGRPO's `init_same_noise`), so its members differ only by
    /// the step noise that the policy gradient credits.
    #[serde(default)]
    pub same_noise: bool,
    /// Train only the sampling steps in `[from, to)` (0 = the noisiest), as Flow-GRPO-Fast and
    /// MixGRPO train a window of the trajectory; `None`: every step.
    #[serde(default)]
    pub train_timesteps: Option<(usize, usize)>,
    /// Guidance of the log-probs that training recomputes (CFG-free training at 1: one
    /// conditional pass, RL as guidance distillation) while sampling keeps `sampler.guidance`;
    /// `None`: the sampler's.
    #[serde(default)]
    pub train_guidance: Option<f64>,
}

fn one() -> usize {
    1
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Is,
            samples_per_epoch: 32,
            sample_batch_size: 16,
            train_batch_size: 8,
            inner_epochs: 1,
            grad_accum: 1,
            timestep_fraction: 1.0,
            clip_range: 0.1,
            adv_clip: 5.0,
            normalisation: Normalisation::PerPrompt { buffer_size: Normalisation::PER_PROMPT.0, min_count: Normalisation::PER_PROMPT.1 },
            rwr_beta: 1.0,
            optimizer: AdamWConfig { lr: 5e-5, warmup_steps: 16, ..Default::default() },
            grad_clip: 1.0,
            sampler: SamplerConfig { steps: 10, ..SamplerConfig::default() },
            reward_workers: 1,
            seed: 0,
            train_text_encoder: false,
            train_only: Vec::new(),
            min_train_sigma: 0.02,
            range_penalty: 0.0,
            kl_weight: 0.0,
            group_size: 1,
            same_noise: false,
            train_timesteps: None,
            train_guidance: None,
        }
    }
}

impl TrainConfig {
    /// The KL weight a run gets when it names none: a KL term to the base model for the
    /// policy-gradient algorithms (the quick start's sweep: without it the shipped model wears
    /// down to noise within 20 epochs), none for RWR, which refuses one. The library's own
    /// `Default` keeps 0, so code that builds a config states what it wants.
    pub fn default_kl_weight(algorithm: Algorithm) -> f64 {
        match algorithm {
            Algorithm::Rwr => 0.0,
            _ => 0.3,
        }
    }

    /// Optimiser steps one epoch takes: a step per `grad_accum` minibatches of `train_batch_size`
    /// over `inner_epochs` passes; DDPO-SF takes one step over the whole epoch.
    pub fn optimizer_steps_per_epoch(&self) -> usize {
        if self.algorithm == Algorithm::Sf {
            return 1;
        }
        (self.inner_epochs * self.samples_per_epoch.div_ceil(self.train_batch_size.max(1))).div_ceil(self.grad_accum.max(1))
    }

    /// Checks every field on its own and against the others.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        let at_least_one = |v: usize, field| ensure(v > 0, field, || "must be at least 1, got 0".into());
        at_least_one(c.samples_per_epoch, "samples_per_epoch")?;
        at_least_one(c.sample_batch_size, "sample_batch_size")?;
        at_least_one(c.train_batch_size, "train_batch_size")?;
        at_least_one(c.inner_epochs, "inner_epochs")?;
        // Families accept eta 0 for evaluation (a deterministic step); a policy gradient needs noise.
        ensure(c.sampler.eta > 0.0, "sampler.eta", || format!("must be > 0 to train: a deterministic sampler has no log-probs, got {}", c.sampler.eta))?;
        at_least_one(c.grad_accum, "grad_accum")?;
        at_least_one(c.reward_workers, "reward_workers")?;
        ensure(c.train_batch_size <= c.samples_per_epoch, "train_batch_size", || {
            format!("{} is larger than samples_per_epoch {}", c.train_batch_size, c.samples_per_epoch)
        })?;
        ensure(c.timestep_fraction > 0.0 && c.timestep_fraction <= 1.0, "timestep_fraction", || format!("must be in (0, 1], got {}", c.timestep_fraction))?;
        let positive = |v: f64, field| ensure(v > 0.0 && v.is_finite(), field, || format!("must be a positive number, got {v}"));
        positive(c.optimizer.lr, "optimizer.lr")?;
        positive(c.clip_range, "clip_range")?;
        positive(c.rwr_beta, "rwr_beta")?;
        let non_negative = |v: f64, field| ensure(v >= 0.0 && v.is_finite(), field, || format!("must be a non-negative number, got {v}"));
        non_negative(c.min_train_sigma, "min_train_sigma")?;
        non_negative(c.range_penalty, "range_penalty")?;
        non_negative(c.kl_weight, "kl_weight")?;
        ensure(c.kl_weight == 0.0 || c.algorithm != Algorithm::Rwr, "kl_weight", || {
            "regularises DDPO-IS / SF updates; RWR has no per-step policy to compare: set it to 0".into()
        })?;
        if let Some(g) = c.train_guidance {
            ensure(g.is_finite() && g >= 0.0, "train_guidance", || format!("must be a finite number >= 0, got {g}"))?;
            ensure(c.algorithm != Algorithm::Rwr, "train_guidance", || "applies to DDPO-IS / SF log-probs; RWR trains the denoising loss: leave it unset".into())?;
        }
        c.validate_groups()?;
        if let Normalisation::PerPrompt { buffer_size, min_count } = c.normalisation {
            // One reward has no spread to normalise by.
            ensure(min_count >= 2, "normalisation.min_count", || format!("must be at least 2, got {min_count}"))?;
            ensure(buffer_size >= min_count, "normalisation.buffer_size", || {
                format!("{buffer_size} is smaller than normalisation.min_count {min_count}: no prompt would ever use its own statistics")
            })?;
        }
        Ok(())
    }

    /// Groups fill the epoch and (for a shared x_T) each sampling batch; a group advantage needs
    /// a group.
    fn validate_groups(&self) -> Result<(), ConfigError> {
        let c = self;
        ensure(c.group_size >= 1, "group_size", || "must be at least 1, got 0".into())?;
        ensure(c.samples_per_epoch % c.group_size == 0, "samples_per_epoch", || {
            format!("{} is not a multiple of group_size {}", c.samples_per_epoch, c.group_size)
        })?;
        ensure(!c.same_noise || c.group_size > 1, "same_noise", || "needs a group_size above 1".into())?;
        ensure(!c.same_noise || c.sample_batch_size % c.group_size == 0, "sample_batch_size", || {
            format!("{} must be a multiple of group_size {} for groups to share their noise", c.sample_batch_size, c.group_size)
        })?;
        ensure(!matches!(c.normalisation, Normalisation::Group { .. }) || c.group_size > 1, "group_size", || {
            "must be above 1 for group-relative advantages".into()
        })?;
        if let Some(window) = c.train_timesteps {
            c.sampler.check_window("train_timesteps", window)?;
        }
        Ok(())
    }

    /// Checks the settings that depend on the family: the sampler, the trained steps, the range
    /// penalty (pixel-space families only).
    pub fn validate_for(&self, family: &dyn Family) -> anyhow::Result<()> {
        self.validate()?;
        family.check_sampler(&self.sampler)?;
        family.check_sampler(&self.train_sampler())?;
        self.trained_steps(family)?;
        ensure(self.range_penalty == 0.0 || family.pixel_range().is_some(), "range_penalty", || {
            "keeps pixel-space samples in range, but this model samples latents, which have no fixed range: set it to 0".into()
        })?;
        Ok(())
    }

    /// The sampler settings under which training recomputes log-probs: the sampler's, with
    /// `train_guidance` where it is set.
    pub fn train_sampler(&self) -> SamplerConfig {
        SamplerConfig { guidance: self.train_guidance.unwrap_or(self.sampler.guidance), ..self.sampler }
    }

    /// Whether training recomputes log-probs under another guidance than sampling used.
    pub fn train_guidance_differs(&self) -> bool {
        self.train_sampler().guidance != self.sampler.guidance
    }

    /// Indices of the sampling steps (0 = the first, noisiest) whose policy sigma reaches
    /// `min_train_sigma` (and is not 0: a deterministic step has no log-prob): the steps the
    /// policy-gradient loss uses.
    pub fn trained_steps(&self, family: &dyn Family) -> Result<Vec<usize>, ConfigError> {
        let timesteps = family.timesteps(self.sampler.steps);
        let sigma = |t: usize| family.step_sigma(t, &self.sampler);
        let window = self.train_timesteps.unwrap_or((0, timesteps.len()));
        let steps: Vec<usize> = (window.0..window.1.min(timesteps.len())).filter(|&k| sigma(timesteps[k]) > 0.0 && sigma(timesteps[k]) >= self.min_train_sigma).collect();
        ensure(!steps.is_empty() || self.algorithm == Algorithm::Rwr, "min_train_sigma", || {
            format!(
                "{} leaves none of the {} sampling steps to train on (their largest sigma is {:.3}): lower it or sample with more steps",
                self.min_train_sigma,
                timesteps.len(),
                timesteps.iter().map(|&t| sigma(t)).fold(0.0, f64::max)
            )
        })?;
        Ok(steps)
    }

    /// Trajectory steps trained on per sample, out of `available`: `timestep_fraction` of them,
    /// at least one.
    pub(super) fn train_steps(&self, available: usize) -> usize {
        ((available as f64 * self.timestep_fraction).ceil() as usize).clamp(1, available)
    }
}
