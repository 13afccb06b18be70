//! The flow-matching family on the shapes world: the same UNet core as the embedded default,
//! trained to predict a rectified flow's velocity v = eps - x0 along x_s = (1 - s) x0 + s eps,
//! sampled with Flow-GRPO's SDE step (a Gaussian policy with a log-prob per step) on shifted
//! sigmas. The trainer, session and samplers see only [`Family`]: a step's label is its
//! timestep round(1000 s), the noise level is the sampler's `eta`.

use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};
use rand::Rng;

use super::ddpm::ddim::gaussian_log_prob;
use super::unet::Policy;
use super::{Conditioning, Family, FlowStep, NoiseRng, SamplerConfig, StepOutput};
use crate::error::ensure;
use crate::kernels::no_grad::with_no_grad;

/// The `steps + 1` sigmas of a trajectory, from 1 (noise) to 0 (image): linear in u, then
/// shifted, s = shift u / (1 + (shift - 1) u), as SD3's `FlowMatchEulerDiscreteScheduler`.
pub fn sigmas(steps: usize, shift: f64) -> Vec<f64> {
    (0..=steps).map(|i| shifted(1.0 - i as f64 / steps as f64, shift)).collect()
}

/// A uniform `u` in [0, 1] shifted toward the noisy end: shift u / (1 + (shift - 1) u).
pub fn shifted(u: f64, shift: f64) -> f64 {
    shift * u / (1.0 + (shift - 1.0) * u)
}

/// Flow-GRPO's SDE step's standard deviation before the sqrt(-dt) factor: a sqrt(s / (1 - s)),
/// with 1 - s taken at the second sigma on the first step (s = 1).
fn std_dev_t(sigmas: &[f64], k: usize, noise_level: f64) -> f64 {
    let s = sigmas[k];
    let denominator = if s >= 1.0 { 1.0 - sigmas.get(1).copied().unwrap_or(0.0) } else { 1.0 - s };
    noise_level * (s / denominator).sqrt()
}

/// Standard deviation of step `k` of the SDE: std_dev_t sqrt(s - s').
pub fn step_std(sigmas: &[f64], k: usize, noise_level: f64) -> f64 {
    std_dev_t(sigmas, k, noise_level) * (sigmas[k] - sigmas[k + 1]).sqrt()
}

/// One SDE step from `x` with velocity `v` between `sigmas[k]` and `sigmas[k + 1]` (Flow-GRPO's
/// `sde_step_with_logprob`): mean x (1 + std^2 dt / 2s) + v (1 + std^2 (1 - s) / 2s) dt with
/// dt = s' - s, variance std_dev_t^2 (-dt); the log-prob of `prev` (given) or of the drawn
/// sample (`noise`), meaned over the non-batch dimensions.
pub fn sde_step(x: &Tensor, v: &Tensor, sigmas: &[f64], k: usize, noise_level: f64, prev: Option<&Tensor>, noise: Option<&Tensor>) -> Result<StepOutput> {
    let (s, s_next) = (sigmas[k], sigmas[k + 1]);
    let dt = s_next - s;
    let sd = std_dev_t(sigmas, k, noise_level);
    let mean = ((x * (1.0 + sd * sd * dt / (2.0 * s)))? + (v * ((1.0 + sd * sd * (1.0 - s) / (2.0 * s)) * dt))?)?;
    gaussian_step(mean, (x - (v * s)?)?, sd * (-dt).sqrt(), prev, noise)
}

/// A Gaussian policy step with the given mean and standard deviation `std`: the drawn sample
/// (`noise`) or the given one (`prev`) and its log-prob, meaned over the non-batch dimensions.
/// `std` 0 is a deterministic step: the sample is the mean and its log-prob 0.
fn gaussian_step(mean: Tensor, pred_original: Tensor, std: f64, prev: Option<&Tensor>, noise: Option<&Tensor>) -> Result<StepOutput> {
    let n = mean.dim(0)?;
    let mut shape = vec![n];
    shape.extend(std::iter::repeat_n(1, mean.rank() - 1));
    let sigma = Tensor::full(std as f32, shape.as_slice(), mean.device())?;
    let prev_sample = match (prev, noise) {
        (Some(p), _) => p.detach(),
        (None, Some(z)) => (&mean + (z * std)?)?.detach(),
        (None, None) => candle_core::bail!("a flow step needs either the stored sample or noise"),
    };
    let log_prob = if std > 0.0 {
        let log_sigma = Tensor::full(std.ln() as f32, shape.as_slice(), mean.device())?;
        gaussian_log_prob(&prev_sample, &mean, &sigma, &log_sigma)?
    } else {
        Tensor::zeros(n, mean.dtype(), mean.device())?
    };
    Ok(StepOutput { prev_sample, mean, pred_original, log_prob, sigma })
}

/// Standard deviation of step `k` of the coefficients-preserving step: s' sin(a pi / 2).
pub fn cps_std(sigmas: &[f64], k: usize, noise_level: f64) -> f64 {
    sigmas[k + 1] * (noise_level * std::f64::consts::FRAC_PI_2).sin()
}

/// One coefficients-preserving step (Flow-GRPO's `sde_type='cps'`): with x0 = x - s v and the
/// noise estimate x1 = x + (1 - s) v, the mean (1 - s') x0 + sqrt(s'^2 - std^2) x1 and the noise
/// std = s' sin(a pi / 2) put exactly s'^2 of noise variance on x', as the flow's path has. Noise
/// level 0 is the Euler ODE step. The log-prob is the Gaussian's (Flow-GRPO's CPS drops the
/// 1 / 2 std^2 and the constants, which rescales its ratios); the final step (s' = 0) is
/// deterministic, with log-prob 0 and std 0, so training skips it.
pub fn cps_step(x: &Tensor, v: &Tensor, sigmas: &[f64], k: usize, noise_level: f64, prev: Option<&Tensor>, noise: Option<&Tensor>) -> Result<StepOutput> {
    let (s, s_next) = (sigmas[k], sigmas[k + 1]);
    let std = cps_std(sigmas, k, noise_level);
    let pred_original = (x - (v * s)?)?;
    let noise_estimate = (x + (v * (1.0 - s))?)?;
    let mean = ((&pred_original * (1.0 - s_next))? + (noise_estimate * (s_next * s_next - std * std).max(0.0).sqrt())?)?;
    gaussian_step(mean, pred_original, std, prev, noise)
}

/// The `steps + 1` sigmas of diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(steps)`
/// (what SD3's pipeline and Flow-GRPO sample with): `steps` values of u spaced evenly from 1 down
/// to the training schedule's smallest sigma, shift(1 / num_train_timesteps), each shifted (so
/// that one is shifted twice, as diffusers does), then 0.
pub fn diffusers_sigmas(steps: usize, shift: f64, num_train_timesteps: usize) -> Vec<f64> {
    let floor = shifted(1.0 / num_train_timesteps as f64, shift);
    let mut s: Vec<f64> = (0..steps)
        .map(|i| if steps == 1 { 1.0 } else { 1.0 - (1.0 - floor) * i as f64 / (steps - 1) as f64 })
        .map(|u| shifted(u, shift))
        .collect();
    s.push(0.0);
    s
}

/// How a flow schedule spaces its steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spacing {
    /// [`sigmas`]: u evenly from 1 to 0 (the shapes flow model).
    Uniform,
    /// [`diffusers_sigmas`]: as diffusers' scheduler (SD3 pipelines).
    Diffusers { num_train_timesteps: usize },
}

/// A flow model's sampling schedule: the shifted sigmas, their step labels, the step kinds and
/// the checks of sampler settings that every flow family shares. A family holds one and adds
/// only its velocity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowSchedule {
    pub shift: f64,
    pub spacing: Spacing,
}

impl FlowSchedule {
    pub fn sigmas(&self, steps: usize) -> Vec<f64> {
        match self.spacing {
            Spacing::Uniform => sigmas(steps, self.shift),
            Spacing::Diffusers { num_train_timesteps } => diffusers_sigmas(steps, self.shift, num_train_timesteps),
        }
    }

    /// See [`Family::check_sampler`].
    pub fn check_sampler(&self, cfg: &SamplerConfig) -> anyhow::Result<()> {
        ensure((1..=1000).contains(&cfg.steps), "sampler.steps", || format!("must be between 1 and 1000, got {}", cfg.steps))?;
        // 0 is the Euler ODE step: deterministic, for evaluation (training refuses it).
        ensure(cfg.eta >= 0.0 && cfg.eta.is_finite(), "sampler.eta", || format!("is the flow SDE's noise level: must be >= 0 (0: the deterministic ODE), got {}", cfg.eta))?;
        ensure(cfg.flow_step != FlowStep::Cps || cfg.eta <= 1.0, "sampler.eta", || format!("is the CPS step's noise level a, std = s' sin(a pi / 2): must be at most 1, got {}", cfg.eta))?;
        if let Some(window) = cfg.sde_window {
            cfg.check_window("sampler.sde_window", window)?;
        }
        ensure(cfg.guidance.is_finite() && cfg.guidance >= 0.0, "sampler.guidance", || format!("must be a finite number >= 0, got {}", cfg.guidance))?;
        let l = self.timesteps(cfg.steps);
        ensure(l.windows(2).all(|w| w[0] > w[1]), "sampler.steps", || format!("{} steps put two steps on one timestep of 1000 at shift {}: use fewer", cfg.steps, self.shift))?;
        Ok(())
    }

    /// See [`Family::eval_sampler`]: the default's steps and guidance, noise level 0 (the ODE).
    pub fn eval_sampler() -> SamplerConfig {
        SamplerConfig { eta: 0.0, ..SamplerConfig::default() }
    }

    /// See [`Family::timesteps`].
    pub fn timesteps(&self, steps: usize) -> Vec<usize> {
        labels(&self.sigmas(steps))
    }

    /// See [`Family::step_sigma`].
    pub fn step_sigma(&self, label: usize, cfg: &SamplerConfig) -> f64 {
        let (_, std) = step_kind(cfg);
        self.index(label, cfg.steps).map_or(0.0, |k| std(&self.sigmas(cfg.steps), k, cfg.noise_level(k)))
    }

    /// The index in the `steps`-step schedule of the step labelled `label`.
    pub fn index(&self, label: usize, steps: usize) -> Result<usize> {
        self.timesteps(steps)
            .iter()
            .position(|&l| l == label)
            .ok_or_else(|| candle_core::Error::Msg(format!("{label} is not a timestep of the {steps}-step flow schedule")))
    }

    /// The one step index of a sampling batch, which moves through the schedule together.
    pub fn batch_index(&self, labels: &[usize], steps: usize) -> Result<usize> {
        let first = *labels.first().ok_or_else(|| candle_core::Error::Msg("an empty batch".into()))?;
        if labels.iter().any(|&l| l != first) {
            candle_core::bail!("a sampling batch moves through the schedule together; got steps {labels:?}");
        }
        self.index(first, steps)
    }

    /// The sigma of each row's step, and each step's index.
    pub fn row_sigmas(&self, labels: &[usize], steps: usize) -> Result<(Vec<usize>, Vec<f64>)> {
        let sigmas = self.sigmas(steps);
        let ks = labels.iter().map(|&label| self.index(label, steps)).collect::<Result<Vec<_>>>()?;
        let s = ks.iter().map(|&k| sigmas[k]).collect();
        Ok((ks, s))
    }

    /// The sampling step from `x` (velocity `v`) at step `k` with standard-normal `noise`.
    pub fn step(&self, x: &Tensor, v: &Tensor, k: usize, cfg: &SamplerConfig, noise: &Tensor) -> Result<StepOutput> {
        flow_step(cfg)(x, v, &self.sigmas(cfg.steps), k, cfg.noise_level(k), None, Some(noise))
    }

    /// The stored transitions `x -> x_prev` recomputed with velocities `v`, one step per row at
    /// the row's own step `ks[i]` (the coefficients depend on the row's sigma).
    pub fn recompute(&self, x: &Tensor, v: &Tensor, x_prev: &Tensor, ks: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        let sigmas = self.sigmas(cfg.steps);
        let mut parts = Vec::with_capacity(ks.len());
        for (i, &k) in ks.iter().enumerate() {
            let row = |t: &Tensor| t.narrow(0, i, 1);
            parts.push(flow_step(cfg)(&row(x)?, &row(v)?, &sigmas, k, cfg.noise_level(k), Some(&row(x_prev)?), None)?);
        }
        let cat = |f: fn(&StepOutput) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
        Ok(StepOutput {
            prev_sample: cat(|p| &p.prev_sample)?,
            mean: cat(|p| &p.mean)?,
            pred_original: cat(|p| &p.pred_original)?,
            log_prob: cat(|p| &p.log_prob)?,
            sigma: cat(|p| &p.sigma)?,
        })
    }

    /// The clean sample's share of x_s at timestep `label` = 1000 s: 1 - s.
    pub fn x0_weight(label: usize) -> f64 {
        1.0 - label as f64 / 1000.0
    }

    /// Flow matching: x_s = (1 - s) x0 + s eps at a shifted uniform s, the squared error of the
    /// velocity `predict(x_s, 1000 s)` against eps - x0, per sample.
    pub fn denoising_loss(&self, x0: &Tensor, rng: &mut NoiseRng, predict: impl FnOnce(&Tensor, &[f32]) -> Result<Tensor>) -> Result<Tensor> {
        let s: Vec<f64> = (0..x0.dim(0)?).map(|_| shifted(rng.rng().random::<f64>(), self.shift)).collect();
        let noise = rng.randn(x0.shape(), x0.device())?;
        let mut col = vec![s.len()];
        col.extend(std::iter::repeat_n(1, x0.rank() - 1));
        let s_col = Tensor::from_vec(s.iter().map(|&v| v as f32).collect::<Vec<_>>(), col, x0.device())?;
        let x_s = (x0.broadcast_mul(&s_col.affine(-1.0, 1.0)?)? + noise.broadcast_mul(&s_col)?)?;
        let times: Vec<f32> = s.iter().map(|&v| (1000.0 * v) as f32).collect();
        (predict(&x_s, &times)? - (noise - x0)?)?.sqr()?.flatten_from(1)?.mean(1)
    }
}

/// A pixel-space rectified-flow policy on the UNet core (its config's `flow_shift` is set).
pub struct FlowPolicy(pub Policy);

impl FlowPolicy {
    pub fn new(policy: Policy) -> anyhow::Result<Self> {
        anyhow::ensure!(policy.config.flow_shift.is_some(), "this model predicts noise, not a flow's velocity (its config has no flow_shift)");
        Ok(Self(policy))
    }

    fn schedule(&self) -> FlowSchedule {
        FlowSchedule { shift: self.0.config.flow_shift.unwrap_or(1.0), spacing: Spacing::Uniform }
    }
}

/// The step function `cfg` chooses, and its standard deviation.
fn step_kind(cfg: &SamplerConfig) -> (StepFn, StdFn) {
    match cfg.flow_step {
        FlowStep::Sde => (sde_step, step_std),
        FlowStep::Cps => (cps_step, cps_std),
    }
}

fn flow_step(cfg: &SamplerConfig) -> StepFn {
    step_kind(cfg).0
}

type StepFn = fn(&Tensor, &Tensor, &[f64], usize, f64, Option<&Tensor>, Option<&Tensor>) -> Result<StepOutput>;
type StdFn = fn(&[f64], usize, f64) -> f64;

/// The labels of a schedule's steps (all but the final sigma 0): round(1000 s).
fn labels(sigmas: &[f64]) -> Vec<usize> {
    sigmas[..sigmas.len() - 1].iter().map(|s| (1000.0 * s).round() as usize).collect()
}

impl Family for FlowPolicy {
    fn device(&self) -> &Device {
        &self.0.device
    }

    fn check_sampler(&self, cfg: &SamplerConfig) -> anyhow::Result<()> {
        self.schedule().check_sampler(cfg)
    }

    fn eval_sampler(&self) -> SamplerConfig {
        FlowSchedule::eval_sampler()
    }

    fn timesteps(&self, steps: usize) -> Vec<usize> {
        self.schedule().timesteps(steps)
    }

    fn step_sigma(&self, label: usize, cfg: &SamplerConfig) -> f64 {
        self.schedule().step_sigma(label, cfg)
    }

    fn sample_shape(&self, n: usize) -> Vec<usize> {
        let s = self.0.config.image_size;
        vec![n, self.0.config.unet.in_channels, s, s]
    }

    fn condition(&self, prompts: &[String]) -> Result<Conditioning> {
        let cond = self.0.encode_prompts(prompts)?.detach();
        let uncond = self.0.encode_prompts(&vec![""; prompts.len()])?.detach();
        Ok(Conditioning(vec![cond, uncond]))
    }

    fn step(&self, cond: &Conditioning, x_t: &Tensor, labels: &[usize], cfg: &SamplerConfig, noise: &Tensor) -> Result<StepOutput> {
        let [c, u] = &cond.0[..] else { candle_core::bail!("the flow family's conditioning is (cond, uncond)") };
        let schedule = self.schedule();
        let k = schedule.batch_index(labels, cfg.steps)?;
        let s = schedule.sigmas(cfg.steps)[k];
        let v = with_no_grad(|| self.0.guided(x_t, &vec![(1000.0 * s) as f32; x_t.dim(0)?], c, u, cfg.guidance))?.detach();
        schedule.step(x_t, &v, k, cfg, noise)
    }

    fn log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, labels: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        let schedule = self.schedule();
        let cond = self.0.encode_prompts(prompts)?;
        let uncond = self.0.encode_prompts(&vec![""; prompts.len()])?;
        // Samples of a minibatch may sit at different steps: one UNet pass at each row's own time.
        let (ks, s) = schedule.row_sigmas(labels, cfg.steps)?;
        let times: Vec<f32> = s.iter().map(|&s| (1000.0 * s) as f32).collect();
        let x = x_t.detach();
        let v = self.0.guided(&x, &times, &cond, &uncond, cfg.guidance)?;
        schedule.recompute(&x, &v, x_prev, &ks, cfg)
    }

    fn has_own_reference(&self) -> bool {
        self.0.config.lora.is_some()
    }

    fn reference_log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, labels: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        super::adapters_off_step(self.has_own_reference(), || self.log_prob(prompts, x_t, x_prev, labels, cfg))
    }

    fn denoising_loss(&self, x0: &Tensor, prompts: &[String], rng: &mut NoiseRng) -> Result<Tensor> {
        let context = self.0.encode_prompts(prompts)?;
        self.schedule().denoising_loss(x0, rng, |x_s, times| self.0.predict(x_s, times, &context))
    }

    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor> {
        Ok(samples.clone())
    }

    fn pixel_range(&self) -> Option<f64> {
        Some(1.0)
    }

    fn x0_weight(&self, label: usize) -> f64 {
        FlowSchedule::x0_weight(label)
    }

    fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.0.trainable_vars()
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.0.save(path)
    }
}
