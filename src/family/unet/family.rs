//! [`Family`] for every epsilon-predicting UNet family: guided noise prediction turned into
//! DDIM steps with log-probs, and the DDPM denoising loss. A family built on the UNet core says
//! only what differs: how its samples become pixels, and how its weights are saved.

use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};
use rand::Rng;

use super::Policy;
use crate::error::ensure;
use crate::family::ddpm::{ddim_sigma, ddim_step};
use crate::family::{Conditioning, Family, FlowStep, NoiseRng, SamplerConfig, StepOutput};
use crate::kernels::no_grad::with_no_grad;

/// A family whose policy is the shared UNet core.
pub trait UNetFamily: Send + Sync {
    fn core(&self) -> &Policy;
    fn core_mut(&mut self) -> &mut Policy;
    /// Side of a square starting sample x_T (pixels, or latent cells).
    fn sample_size(&self) -> usize;
    /// Final samples as images in -1..1.
    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor>;
    /// See [`Family::pixel_range`].
    fn pixel_range(&self) -> Option<f64>;
    /// See [`Family::save`].
    fn save(&self, path: &Path) -> anyhow::Result<()>;
}

impl<T: UNetFamily> Family for T {
    fn device(&self) -> &Device {
        &self.core().device
    }

    fn check_sampler(&self, cfg: &SamplerConfig) -> anyhow::Result<()> {
        let max = self.core().schedule.num_train_timesteps();
        ensure((1..=max).contains(&cfg.steps), "sampler.steps", || format!("must be between 1 and {max}, got {}", cfg.steps))?;
        ensure(cfg.eta > 0.0 && cfg.eta.is_finite(), "sampler.eta", || format!("must be > 0 for a stochastic policy with log-probs, got {}", cfg.eta))?;
        ensure(cfg.guidance.is_finite() && cfg.guidance >= 0.0, "sampler.guidance", || format!("must be a finite number >= 0, got {}", cfg.guidance))?;
        ensure(cfg.flow_step == FlowStep::Sde, "sampler.flow_step", || "chooses a flow model's step; this model steps with DDIM".into())?;
        ensure(cfg.sde_window.is_none(), "sampler.sde_window", || "is for flow models: a DDIM step at eta 0 has no log-prob, so this model samples every step at --eta".into())?;
        Ok(())
    }

    fn timesteps(&self, steps: usize) -> Vec<usize> {
        self.core().schedule.ddim_timesteps(steps)
    }

    fn step_sigma(&self, t: usize, cfg: &SamplerConfig) -> f64 {
        let schedule = &self.core().schedule;
        ddim_sigma(schedule, t, schedule.prev_timestep(t, cfg.steps), cfg.eta)
    }

    fn sample_shape(&self, n: usize) -> Vec<usize> {
        let s = self.sample_size();
        vec![n, self.core().config.unet.in_channels, s, s]
    }

    fn condition(&self, prompts: &[String]) -> Result<Conditioning> {
        let core = self.core();
        let cond = core.encode_prompts(prompts)?.detach();
        let uncond = core.encode_prompts(&vec![""; prompts.len()])?.detach();
        Ok(Conditioning(vec![cond, uncond]))
    }

    fn step(&self, cond: &Conditioning, x_t: &Tensor, timesteps: &[usize], cfg: &SamplerConfig, noise: &Tensor) -> Result<StepOutput> {
        let core = self.core();
        let [c, u] = &cond.0[..] else { candle_core::bail!("a UNet family's conditioning is (cond, uncond)") };
        let eps = with_no_grad(|| core.guided_eps(x_t, timesteps, c, u, cfg.guidance))?.detach();
        ddim_step(&core.schedule, &eps, timesteps, x_t, cfg.steps, cfg.eta, None, Some(noise))
    }

    fn log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, timesteps: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        let core = self.core();
        let cond = core.encode_prompts(prompts)?;
        let uncond = core.encode_prompts(&vec![""; prompts.len()])?;
        let eps = core.guided_eps(&x_t.detach(), timesteps, &cond, &uncond, cfg.guidance)?;
        ddim_step(&core.schedule, &eps, timesteps, &x_t.detach(), cfg.steps, cfg.eta, Some(x_prev), None)
    }

    fn has_own_reference(&self) -> bool {
        self.core().config.lora.is_some()
    }

    fn reference_log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, timesteps: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        crate::family::adapters_off_step(self.has_own_reference(), || self.log_prob(prompts, x_t, x_prev, timesteps, cfg))
    }

    fn denoising_loss(&self, x0: &Tensor, prompts: &[String], rng: &mut NoiseRng) -> Result<Tensor> {
        let core = self.core();
        let t: Vec<usize> = prompts.iter().map(|_| rng.rng().random_range(0..core.schedule.num_train_timesteps())).collect();
        let noise = rng.randn(x0.shape(), &core.device)?;
        let x_t = core.schedule.add_noise(x0, &noise, &t)?;
        let ctx = core.encode_prompts(prompts)?;
        // The model's own objective: its raw output against its target (the noise, or v).
        let pred = core.predict(&x_t, &t.iter().map(|&t| t as f32).collect::<Vec<_>>(), &ctx)?;
        (pred - core.schedule.training_target(x0, &noise, &t)?)?.sqr()?.flatten_from(1)?.mean(1)
    }

    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor> {
        UNetFamily::decode(self, samples)
    }

    fn pixel_range(&self) -> Option<f64> {
        UNetFamily::pixel_range(self)
    }

    fn x0_weight(&self, t: usize) -> f64 {
        self.core().schedule.alpha_bar(t)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.core().trainable_vars()
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        UNetFamily::save(self, path)
    }
}
