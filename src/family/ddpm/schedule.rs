//! The DDPM noise schedule (betas, alphas, cumulative alphas) and DDIM timestep selection,
//! following diffusers' scheduler config fields so a `scheduler_config.json` loads directly.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Scheduler configuration with diffusers' field names (the fields this project supports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// `linear` (DDPM) or `scaled_linear` (Stable Diffusion).
    pub beta_schedule: String,
    /// Added to every DDIM timestep (`leading` spacing), 1 for Stable Diffusion.
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    /// Clamp the predicted x0 to +-`clip_sample_range` inside each DDIM step (diffusers'
    /// `clip_sample`). Pixel-space models need it: early in the reverse process x0 is the noisy
    /// input divided by sqrt(alpha-bar) ~ 0.01, so small noise errors blow up into saturated,
    /// off-palette colours. Latent models (Stable Diffusion) leave it off.
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
}

fn default_clip_range() -> f64 {
    1.0
}

fn default_train_steps() -> usize {
    1000
}
fn default_spacing() -> String {
    "leading".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}

impl ScheduleConfig {
    /// DDPM's linear schedule, the usual choice in pixel space (the embedded default).
    pub fn pixel_default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            // Offset 1 keeps the last DDIM step at t=1 -> 0, whose variance is positive; with 0 the
            // last step would go 0 -> 0 and its log-prob would be undefined.
            steps_offset: 1,
            timestep_spacing: "leading".into(),
            prediction_type: "epsilon".into(),
            clip_sample: false,
            clip_sample_range: 1.0,
        }
    }
}

/// Cumulative products of alphas, the one quantity DDPM training and DDIM sampling need.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub config: ScheduleConfig,
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn new(config: ScheduleConfig) -> anyhow::Result<Self> {
        let n = config.num_train_timesteps;
        anyhow::ensure!(n >= 2, "scheduler: num_train_timesteps must be at least 2, got {n}");
        anyhow::ensure!(
            ["epsilon", "v_prediction"].contains(&config.prediction_type.as_str()),
            "scheduler: prediction_type {:?} is not supported (use \"epsilon\" or \"v_prediction\")",
            config.prediction_type
        );
        anyhow::ensure!(
            config.timestep_spacing == "leading",
            "scheduler: timestep_spacing {:?} is not supported (only \"leading\")",
            config.timestep_spacing
        );
        let (b0, b1) = (config.beta_start, config.beta_end);
        let lerp = |i: usize, a: f64, b: f64| a + (b - a) * i as f64 / (n - 1) as f64;
        let betas: Vec<f64> = match config.beta_schedule.as_str() {
            "linear" => (0..n).map(|i| lerp(i, b0, b1)).collect(),
            "scaled_linear" => (0..n).map(|i| lerp(i, b0.sqrt(), b1.sqrt()).powi(2)).collect(),
            other => anyhow::bail!(
                "scheduler: beta_schedule {other:?} is not supported (use \"linear\" or \"scaled_linear\")"
            ),
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(Self { config, alphas_cumprod })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// alpha-bar at training timestep `t`.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }

    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// sqrt(ab_t) and sqrt(1 - ab_t) per batch row, shaped (rows, 1, 1, 1) to broadcast over
    /// images: the signal and noise scales of x_t = signal x0 + noise_scale eps.
    fn scales(&self, t: &[usize], device: &candle_core::Device) -> candle_core::Result<(Tensor, Tensor)> {
        let column = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = t.iter().map(|&t| f(self.alpha_bar(t)) as f32).collect();
            Tensor::from_vec(v, (t.len(), 1, 1, 1), device)
        };
        Ok((column(&f64::sqrt)?, column(&|ab| (1.0 - ab).sqrt())?))
    }

    /// Forward process q(x_t | x_0): sqrt(ab_t) x0 + sqrt(1 - ab_t) noise, one `t` per batch row.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> candle_core::Result<Tensor> {
        let (signal, noise_scale) = self.scales(t, x0.device())?;
        x0.broadcast_mul(&signal)? + noise.broadcast_mul(&noise_scale)?
    }

    /// Whether the model predicts v = sqrt(ab) eps - sqrt(1 - ab) x0 (Stable Diffusion 2's
    /// v-prediction) rather than the noise.
    pub fn predicts_v(&self) -> bool {
        self.config.prediction_type == "v_prediction"
    }

    /// What the model learns to output at `t`: the noise, or v. v keeps x0's estimate bounded
    /// at high noise, where eps-prediction divides its error by sqrt(ab) ~ 0.01.
    pub fn training_target(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> candle_core::Result<Tensor> {
        if !self.predicts_v() {
            return Ok(noise.clone());
        }
        let (signal, noise_scale) = self.scales(t, x0.device())?;
        noise.broadcast_mul(&signal)? - x0.broadcast_mul(&noise_scale)?
    }

    /// The noise that the model's `output` at `x_t` implies: the output itself, or from v,
    /// eps = sqrt(ab) v + sqrt(1 - ab) x_t. The DDIM step and its log-prob take eps.
    pub fn eps_from_output(&self, output: Tensor, x_t: &Tensor, t: &[usize]) -> candle_core::Result<Tensor> {
        if !self.predicts_v() {
            return Ok(output);
        }
        let (signal, noise_scale) = self.scales(t, x_t.device())?;
        output.broadcast_mul(&signal)? + x_t.broadcast_mul(&noise_scale)?
    }

    /// DDIM timesteps for `steps` inference steps, from the noisiest down ("leading" spacing).
    pub fn ddim_timesteps(&self, steps: usize) -> Vec<usize> {
        let ratio = self.num_train_timesteps() / steps;
        (0..steps).rev().map(|i| i * ratio + self.config.steps_offset).collect()
    }

    /// The timestep a DDIM step from `t` lands on, clamped at 0 as the DDPO reference does so that
    /// the last step keeps a positive variance.
    pub fn prev_timestep(&self, t: usize, steps: usize) -> usize {
        t.saturating_sub(self.num_train_timesteps() / steps)
    }
}
