//! Whole trajectories from a family, recording every transition and its log-prob, and the
//! differentiable recompute of a stored transition's log-prob under the current weights.

use std::path::Path;

use candle_core::{Result, Tensor};

use crate::family::{Family, NoiseRng, SamplerConfig, StepOutput};

/// One batch of sampled trajectories.
#[derive(Debug, Clone)]
pub struct Trajectory {
    pub prompts: Vec<String>,
    /// The training timestep at each step, noisiest first.
    pub timesteps: Vec<usize>,
    /// x_T, ..., x_0: `steps + 1` tensors of shape (N, ..).
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

/// Samples one trajectory per prompt, recording transitions and log-probs. No gradient.
pub fn sample(family: &dyn Family, prompts: &[String], cfg: &SamplerConfig, rng: &mut NoiseRng) -> Result<Trajectory> {
    sample_grouped(family, prompts, cfg, rng, 1)
}

/// As [`sample`], with each run of `group` consecutive prompts starting from one shared x_T
/// (their step noise still differs).
pub fn sample_grouped(family: &dyn Family, prompts: &[String], cfg: &SamplerConfig, rng: &mut NoiseRng, group: usize) -> Result<Trajectory> {
    let device = family.device();
    let cond = family.condition(prompts)?;
    let timesteps = family.timesteps(cfg.steps);
    let mut x = start(family, prompts.len(), group, rng)?;
    let mut latents = vec![x.clone()];
    let mut log_probs = Vec::with_capacity(cfg.steps);
    for &t in &timesteps {
        let ts = vec![t; prompts.len()];
        let noise = rng.randn(x.shape(), device)?;
        let out = family.step(&cond, &x, &ts, cfg, &noise)?;
        x = out.prev_sample;
        latents.push(x.clone());
        log_probs.push(out.log_prob);
    }
    Ok(Trajectory { prompts: prompts.to_vec(), timesteps, latents, log_probs: Tensor::stack(&log_probs, 1)? })
}

/// x_T for `n` samples, one draw per run of `group` of them.
fn start(family: &dyn Family, n: usize, group: usize, rng: &mut NoiseRng) -> Result<Tensor> {
    let group = group.max(1);
    if group == 1 {
        return rng.randn(family.sample_shape(n), family.device());
    }
    let distinct = rng.randn(family.sample_shape(n.div_ceil(group)), family.device())?;
    let rows: Vec<u32> = (0..n).map(|i| (i / group) as u32).collect();
    distinct.index_select(&Tensor::new(rows, family.device())?, 0)
}

/// Recomputes a stored transition x_t -> x_prev under the current weights, differentiably: its
/// log p(x_prev | x_t, c) and predicted x0. `x_t`, `x_prev` are data.
pub fn transition(family: &dyn Family, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, timesteps: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
    family.log_prob(prompts, x_t, x_prev, timesteps, cfg)
}

/// Images for `prompts`, sampled `batch` at a time from one seeded noise stream.
pub fn sample_images(family: &dyn Family, prompts: &[String], cfg: &SamplerConfig, seed: u64, batch: usize) -> anyhow::Result<Vec<image::RgbImage>> {
    Ok(sample_images_with_range(family, prompts, cfg, seed, batch)?.0)
}

/// [`sample_images`], and the share of the final samples' values outside the family's pixel
/// range (what an image clamps away; NaN for a family without one, such as latents).
pub fn sample_images_with_range(family: &dyn Family, prompts: &[String], cfg: &SamplerConfig, seed: u64, batch: usize) -> anyhow::Result<(Vec<image::RgbImage>, f64)> {
    let mut rng = NoiseRng::new(seed);
    let mut images = Vec::with_capacity(prompts.len());
    let (mut outside, mut values) = (0.0, 0usize);
    for chunk in prompts.chunks(batch.max(1)) {
        let traj = sample(family, chunk, cfg, &mut rng)?;
        let finals = traj.final_sample();
        if let Some(range) = family.pixel_range() {
            outside += count_out_of_range(finals, range)?;
            values += finals.elem_count();
        }
        images.extend(family.images(finals)?);
    }
    Ok((images, if values > 0 { outside / values as f64 } else { f64::NAN }))
}

/// How many of `values` lie outside [-range, range].
pub fn count_out_of_range(values: &Tensor, range: f64) -> candle_core::Result<f64> {
    Ok(values.abs()?.gt(range)?.to_dtype(candle_core::DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// A labelled grid of one sample per prompt, written as a PNG.
pub fn write_sample_grid(family: &dyn Family, prompts: &[String], cfg: &SamplerConfig, seed: u64, path: &Path) -> anyhow::Result<()> {
    let images = sample_images(family, prompts, cfg, seed, 64)?;
    let cols = (prompts.len() as f64).sqrt().ceil() as usize;
    let grid = crate::render::labelled_grid(&images, prompts, cols, 3);
    crate::render::save_png(&grid, path)
}
