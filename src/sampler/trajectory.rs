//! Whole DDIM trajectories from a policy, recording every transition and its log-prob, and the
//! differentiable recompute of a stored transition's log-prob under the current weights.

use candle_core::{Result, Tensor};

use super::ddim::{ddim_step, StepOutput};
use super::noise::NoiseRng;
use crate::policy::Policy;

/// Sampler settings (DDPO's defaults: eta 1 for a truly stochastic policy, guidance 5).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerConfig {
    pub steps: usize,
    pub eta: f64,
    pub guidance: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { steps: 20, eta: 1.0, guidance: 5.0 }
    }
}

impl SamplerConfig {
    pub fn validate(&self, num_train_timesteps: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=num_train_timesteps).contains(&self.steps),
            "steps must be between 1 and {num_train_timesteps}, got {}",
            self.steps
        );
        anyhow::ensure!(self.eta > 0.0 && self.eta.is_finite(), "eta must be > 0 for a stochastic policy with log-probs, got {}", self.eta);
        anyhow::ensure!(self.guidance.is_finite() && self.guidance >= 0.0, "guidance must be a finite number >= 0, got {}", self.guidance);
        Ok(())
    }
}

/// One batch of sampled trajectories.
#[derive(Debug, Clone)]
pub struct Trajectory {
    pub prompts: Vec<String>,
    /// The training timestep at each DDIM step, noisiest first.
    pub timesteps: Vec<usize>,
    /// x_T, ..., x_0: `steps + 1` tensors of shape (N, C, H, W).
    pub latents: Vec<Tensor>,
    /// log p(x_{k+1} | x_k, c) for each sample and step, (N, steps).
    pub log_probs: Tensor,
}

impl Trajectory {
    /// The final samples x_0 (pixel space for the embedded default).
    pub fn final_sample(&self) -> &Tensor {
        self.latents.last().expect("a trajectory has at least x_T")
    }
}

/// Samples one trajectory per prompt with DDIM, recording transitions and log-probs. No gradient.
pub fn sample(policy: &Policy, prompts: &[String], cfg: &SamplerConfig, rng: &mut NoiseRng) -> Result<Trajectory> {
    crate::model::lora::with_adapters_detached(|| sample_untracked(policy, prompts, cfg, rng))
}

fn sample_untracked(policy: &Policy, prompts: &[String], cfg: &SamplerConfig, rng: &mut NoiseRng) -> Result<Trajectory> {
    let n = prompts.len();
    let cond = policy.encode_prompts(prompts)?.detach();
    let uncond = policy.encode_prompts(&vec![""; n])?.detach();
    let timesteps = policy.schedule.ddim_timesteps(cfg.steps);
    let mut x = rng.randn(policy.sample_shape(n), &policy.device)?;
    let mut latents = vec![x.clone()];
    let mut log_probs = Vec::with_capacity(cfg.steps);
    for &t in &timesteps {
        let ts = vec![t; n];
        let eps = policy.guided_eps(&x, &ts, &cond, &uncond, cfg.guidance)?.detach();
        let noise = rng.randn(x.shape(), &policy.device)?;
        let out = ddim_step(&policy.schedule, &eps, &ts, &x, cfg.steps, cfg.eta, None, Some(&noise))?;
        x = out.prev_sample;
        latents.push(x.clone());
        log_probs.push(out.log_prob);
    }
    Ok(Trajectory { prompts: prompts.to_vec(), timesteps, latents, log_probs: Tensor::stack(&log_probs, 1)? })
}

/// Recomputes the DDIM step of a stored transition x_t -> x_prev under the current weights,
/// differentiably: its log p(x_prev | x_t, c) and predicted x0. Gradients reach the UNet and
/// text encoder through the guided noise prediction; `x_t`, `x_prev` are data.
pub fn transition(
    policy: &Policy,
    prompts: &[String],
    x_t: &Tensor,
    x_prev: &Tensor,
    timesteps: &[usize],
    cfg: &SamplerConfig,
) -> Result<StepOutput> {
    let cond = policy.encode_prompts(prompts)?;
    let uncond = policy.encode_prompts(&vec![""; prompts.len()])?;
    let eps = policy.guided_eps(&x_t.detach(), timesteps, &cond, &uncond, cfg.guidance)?;
    ddim_step(&policy.schedule, &eps, timesteps, &x_t.detach(), cfg.steps, cfg.eta, Some(x_prev), None)
}
