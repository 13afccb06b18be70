//! A third model family for tests: a Gaussian policy with closed-form log-probs, to prove that
//! the trainer and the session never ask which family they hold.
//!
//! Samples are (N, 3, 4, 4) tensors. Each reverse step is x_prev ~ N(mean, sigma_t^2) with
//! mean = DECAY * x_t + theta (theta: one trainable value per element), sigma_t = SIGMA * t / T,
//! so its log-density is known exactly. Prompts are ignored; the final sample is the image.

use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};
use ddpo::family::{Conditioning, Family, NoiseRng, SamplerConfig, StepOutput};

pub const DECAY: f64 = 0.5;
pub const SIGMA: f64 = 0.4;
/// Training timesteps: step k of a `steps`-step trajectory is at t = T - k T / steps.
pub const T: usize = 100;
pub const SHAPE: [usize; 3] = [3, 4, 4];

pub struct GaussianFamily {
    pub theta: Var,
    device: Device,
}

impl GaussianFamily {
    /// theta starts at `init` everywhere.
    pub fn new(init: f32) -> Self {
        let device = Device::Cpu;
        let theta = Var::from_tensor(&(Tensor::ones(SHAPE.to_vec(), candle_core::DType::F32, &device).unwrap() * init as f64).unwrap()).unwrap();
        Self { theta, device }
    }

    /// sigma of the step from `t`.
    pub fn sigma(t: usize) -> f64 {
        SIGMA * t as f64 / T as f64
    }

    fn mean(&self, x_t: &Tensor) -> Result<Tensor> {
        (x_t * DECAY)?.broadcast_add(self.theta.as_tensor())
    }

    fn output(&self, x_t: &Tensor, x_prev: Tensor, t: &[usize]) -> Result<StepOutput> {
        let mean = self.mean(x_t)?;
        let sigmas: Vec<f32> = t.iter().map(|&t| Self::sigma(t) as f32).collect();
        let sigma = Tensor::from_vec(sigmas, (t.len(), 1, 1, 1), &self.device)?;
        let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
        let lp = (&x_prev - &mean)?.sqr()?.broadcast_div(&(sigma.sqr()? * 2.0)?)?.neg()?.broadcast_sub(&sigma.log()?)?.affine(1.0, -half_log_2pi)?;
        let log_prob = lp.flatten_from(1)?.mean(1)?;
        Ok(StepOutput { prev_sample: x_prev, pred_original: mean.clone(), mean, log_prob, sigma })
    }
}

impl Family for GaussianFamily {
    fn device(&self) -> &Device {
        &self.device
    }

    fn check_sampler(&self, cfg: &SamplerConfig) -> anyhow::Result<()> {
        anyhow::ensure!((1..=T).contains(&cfg.steps), "steps must be between 1 and {T}");
        Ok(())
    }

    fn timesteps(&self, steps: usize) -> Vec<usize> {
        (0..steps).map(|k| T - k * T / steps).collect()
    }

    fn step_sigma(&self, t: usize, _cfg: &SamplerConfig) -> f64 {
        Self::sigma(t)
    }

    fn sample_shape(&self, n: usize) -> Vec<usize> {
        [vec![n], SHAPE.to_vec()].concat()
    }

    fn condition(&self, _prompts: &[String]) -> Result<Conditioning> {
        Ok(Conditioning(Vec::new()))
    }

    fn step(&self, _cond: &Conditioning, x_t: &Tensor, t: &[usize], _cfg: &SamplerConfig, noise: &Tensor) -> Result<StepOutput> {
        let sigmas: Vec<f32> = t.iter().map(|&t| Self::sigma(t) as f32).collect();
        let sigma = Tensor::from_vec(sigmas, (t.len(), 1, 1, 1), &self.device)?;
        let x_prev = self.mean(x_t)?.add(&noise.broadcast_mul(&sigma)?)?.detach();
        let out = self.output(x_t, x_prev, t)?;
        Ok(StepOutput { log_prob: out.log_prob.detach(), mean: out.mean.detach(), pred_original: out.pred_original.detach(), ..out })
    }

    fn log_prob(&self, _prompts: &[String], x_t: &Tensor, x_prev: &Tensor, t: &[usize], _cfg: &SamplerConfig) -> Result<StepOutput> {
        self.output(x_t, x_prev.detach(), t)
    }

    fn denoising_loss(&self, x0: &Tensor, _prompts: &[String], _rng: &mut NoiseRng) -> Result<Tensor> {
        x0.broadcast_sub(self.theta.as_tensor())?.sqr()?.flatten_from(1)?.mean(1)
    }

    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor> {
        Ok(samples.clamp(-1.0, 1.0)?)
    }

    fn pixel_range(&self) -> Option<f64> {
        Some(1.0)
    }

    fn x0_weight(&self, _t: usize) -> f64 {
        1.0
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        vec![("theta".to_string(), self.theta.clone())]
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tensors = std::collections::HashMap::from([("theta".to_string(), self.theta.as_tensor().clone())]);
        ddpo::io::save_tensors_atomic(&tensors, path)
    }
}
