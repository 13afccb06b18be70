//! Model families behind one trait, [`Family`]: what the sampler and the trainer need of a
//! text-conditioned diffusion policy, and nothing about how a family computes it.
//!
//! - [`shapes`]: the embedded default, a pixel-space UNet over the shapes world.
//! - [`sd`]: Stable Diffusion 1.x / 2.x diffusers folders (latent space, CLIP BPE, VAE).
//! - [`flow`]: the rectified-flow variant of the shapes model, and the flow schedule and steps
//!   (Flow-GRPO's SDE and CPS) that every flow family shares.
//! - [`sd3`]: Stable Diffusion 3 / 3.5 diffusers folders (a latent flow model, MMDiT).
//!
//! Both are epsilon-predicting UNets sampled with DDIM, so they share [`unet`] (the networks,
//! guided noise prediction, checkpoints) and [`ddpm`] (the noise schedule and the DDIM step);
//! the flow families implement [`Family`] directly over [`flow::FlowSchedule`].
//! [`open_trainable`] / [`open_frozen`] pick the family from what is on disk.

pub mod ddpm;
pub mod flow;
pub mod noise;
pub mod sd;
pub mod sd3;
pub mod shapes;
pub mod unet;

use std::path::Path;

use candle_core::{Device, Result, Tensor, Var};

pub use noise::{NoiseRng, NoiseRngState};
pub use shapes::PixelPolicy;
pub use sd::LatentPolicy;
pub use unet::{Policy, PolicyConfig, WeightDtype};

/// Sampler settings (DDPO's defaults: eta 1 for a truly stochastic policy, guidance 5).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplerConfig {
    pub steps: usize,
    pub eta: f64,
    pub guidance: f64,
    /// The flow family's kind of stochastic step; the DDPM families accept only the default.
    #[serde(default)]
    pub flow_step: FlowStep,
    /// Steps FROM..TO (0 = the noisiest) sample at noise level `eta`, every other step
    /// deterministically (Flow-GRPO-Fast's SDE window, ODE elsewhere): a group's samples then
    /// differ only by what the window decided. `None`: every step at `eta`.
    #[serde(default)]
    pub sde_window: Option<(usize, usize)>,
}

impl SamplerConfig {
    /// `steps` steps at noise level `eta` and guidance `guidance`, with the default step kind.
    pub const fn new(steps: usize, eta: f64, guidance: f64) -> Self {
        Self { steps, eta, guidance, flow_step: FlowStep::Sde, sde_window: None }
    }

    /// Checks that `window` (FROM..TO, TO excluded) lies within this sampler's steps; `field`
    /// names the setting in the error.
    pub fn check_window(&self, field: &'static str, (from, to): (usize, usize)) -> std::result::Result<(), crate::error::ConfigError> {
        crate::error::ensure(from < to && to <= self.steps, field, || format!("{from}..{to} is not a window of the {} sampling steps (from < to <= steps)", self.steps))
    }

    /// The noise level of step `k`: `eta` inside the SDE window, 0 outside it.
    pub fn noise_level(&self, k: usize) -> f64 {
        match self.sde_window {
            Some((from, to)) if !(from..to).contains(&k) => 0.0,
            _ => self.eta,
        }
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self::new(20, 1.0, 5.0)
    }
}

/// How a flow model steps (Flow-GRPO's `sde_type`), at noise level `eta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowStep {
    /// The SDE whose marginals match the flow's ODE (Flow-GRPO's default).
    #[default]
    Sde,
    /// Coefficients-preserving sampling: the step keeps x0's and the noise's coefficients on the
    /// flow's path (x = (1 - s) x0 + s eps) exactly, so samples carry no excess noise at few steps.
    Cps,
}

/// The output of one reverse step x_t -> x_{t-1} of a Gaussian policy.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// x_{t-1}: the drawn sample (or the given one, when recomputing).
    pub prev_sample: Tensor,
    /// Mean of the Gaussian policy at this step.
    pub mean: Tensor,
    /// The clean sample the step predicts, before any clamp.
    pub pred_original: Tensor,
    /// log p(x_{t-1} | x_t, c), (N,), averaged over all non-batch dimensions.
    pub log_prob: Tensor,
    /// Standard deviation of the Gaussian policy at this step, broadcastable: (N, 1, ..).
    pub sigma: Tensor,
}

/// A family's encoding of a batch of prompts, opaque to the sampler (for the UNet families: the
/// conditional and unconditional text states).
pub struct Conditioning(pub Vec<Tensor>);

/// A text-conditioned diffusion policy: a stochastic reverse process whose every step has a
/// log-probability, plus what training needs of it.
pub trait Family: Send + Sync {
    fn device(&self) -> &Device;

    /// Checks sampler settings against the family (number of steps, eta, guidance).
    fn check_sampler(&self, cfg: &SamplerConfig) -> anyhow::Result<()>;

    /// The sampler evaluations use unless told otherwise (`ddpo eval` and `sample`, the gold
    /// monitor): DDIM families sample as DDPO trains them (eta 1); flow families override it with
    /// the deterministic ODE, as SD3's pipeline and Flow-GRPO's evaluation sample.
    fn eval_sampler(&self) -> SamplerConfig {
        SamplerConfig::default()
    }

    /// The step labels of a `steps`-step trajectory, noisiest first (training timesteps).
    fn timesteps(&self, steps: usize) -> Vec<usize>;

    /// Standard deviation of the policy's step from `t` under `cfg`.
    fn step_sigma(&self, t: usize, cfg: &SamplerConfig) -> f64;

    /// Shape of a batch of `n` starting samples x_T.
    fn sample_shape(&self, n: usize) -> Vec<usize>;

    /// Encodes prompts once for a whole trajectory.
    fn condition(&self, prompts: &[String]) -> Result<Conditioning>;

    /// One reverse step from `x_t` at `timesteps` with the given standard-normal `noise`, without
    /// gradients (sampling).
    fn step(&self, cond: &Conditioning, x_t: &Tensor, timesteps: &[usize], cfg: &SamplerConfig, noise: &Tensor) -> Result<StepOutput>;

    /// The stored transition `x_t -> x_prev` recomputed under the current weights, differentiably:
    /// its log-prob and mean carry gradients to the trainable weights.
    fn log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, timesteps: &[usize], cfg: &SamplerConfig) -> Result<StepOutput>;

    /// Whether the policy carries its own frozen reference for the KL term (LoRA: the same
    /// weights with the adapters off), so that no second copy of the model is needed.
    fn has_own_reference(&self) -> bool {
        false
    }

    /// [`Family::log_prob`] under the policy's own frozen reference, without gradients; an error
    /// where [`Family::has_own_reference`] is false.
    fn reference_log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, timesteps: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        let _ = (prompts, x_t, x_prev, timesteps, cfg);
        candle_core::bail!("this policy has no adapters to switch off; open a separate reference model")
    }

    /// Per-sample denoising loss of clean samples `x0` (N,): the family's pretraining objective,
    /// which RWR weights. Randomness (timesteps, noise) is drawn from `rng`.
    fn denoising_loss(&self, x0: &Tensor, prompts: &[String], rng: &mut NoiseRng) -> Result<Tensor>;

    /// Final samples as images in -1..1, (N, 3, H, W).
    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor>;

    /// The value range of final samples when they are pixels (`None` for latents, which have no
    /// fixed range): what the out-of-range measure and the range penalty use.
    fn pixel_range(&self) -> Option<f64>;

    /// How much the predicted clean sample at `t` counts in the range penalty: its share of x_t.
    fn x0_weight(&self, t: usize) -> f64;

    /// The trainable variables, sorted by name (empty for a frozen policy).
    fn trainable_vars(&self) -> Vec<(String, Var)>;

    /// Saves the trained weights (and what is needed to load them again) atomically.
    fn save(&self, path: &Path) -> anyhow::Result<()>;

    /// Final samples as RGB images (what rewards score).
    fn images(&self, samples: &Tensor) -> anyhow::Result<Vec<image::RgbImage>> {
        Ok(crate::render::tensor_to_images(&self.decode(samples)?)?)
    }
}

/// A step computed with the LoRA adapters off and no gradients (the KL reference), or an error
/// when the policy has no adapters (`has_adapters`).
fn adapters_off_step(has_adapters: bool, step: impl FnOnce() -> Result<StepOutput>) -> Result<StepOutput> {
    if !has_adapters {
        candle_core::bail!("this policy has no adapters to switch off; open a separate reference model");
    }
    let s = crate::kernels::no_grad::without_adapters(|| crate::kernels::no_grad::with_no_grad(step))?;
    Ok(StepOutput { prev_sample: s.prev_sample.detach(), mean: s.mean.detach(), pred_original: s.pred_original.detach(), log_prob: s.log_prob.detach(), sigma: s.sigma.detach() })
}

/// What a model path holds, as far as choosing its family goes.
enum Source {
    /// A `StableDiffusionPipeline` folder (or a folder without `model_index.json`).
    SdPipeline,
    /// A `StableDiffusion3Pipeline` folder.
    Sd3Pipeline,
    /// A policy checkpoint file.
    Checkpoint,
}

/// Reads what `model` is from `model_index.json`'s pipeline class; a pipeline no family loads
/// is an error that names it.
fn source(model: &Path) -> anyhow::Result<Source> {
    if !model.is_dir() {
        return Ok(Source::Checkpoint);
    }
    Ok(match sd3::pipeline::pipeline_class(model)?.as_deref() {
        Some(sd3::pipeline::PIPELINE_CLASS) => Source::Sd3Pipeline,
        None | Some("StableDiffusionPipeline") => Source::SdPipeline,
        Some(other) => anyhow::bail!(
            "{}: model_index.json names {other}, which ddpo cannot load; --model-dir takes a StableDiffusionPipeline (SD 1.x / 2.x) or StableDiffusion3Pipeline (SD3 / SD3.5) folder",
            model.display()
        ),
    })
}

/// Opens `model` for training: a diffusers folder as [`LatentPolicy`] (SD 1.x / 2.x) or
/// [`sd3::Sd3Policy`], a policy checkpoint file as [`PixelPolicy`] or [`flow::FlowPolicy`]; with
/// `options.lora`, fresh adapters (seeded) are the only trainable weights.
pub fn open_trainable(model: &Path, options: &OpenOptions, device: &Device) -> anyhow::Result<Box<dyn Family>> {
    let (lora, seed, dtype) = (options.lora, options.seed, options.dtype);
    Ok(match source(model)? {
        Source::SdPipeline => boxed(LatentPolicy::open_trainable(model, lora, seed, dtype, device)?, options),
        Source::Sd3Pipeline => flow_options(Box::new(sd3::Sd3Policy::open_trainable(model, lora, seed, dtype.dtype(), device)?), options)?,
        Source::Checkpoint => pixel_or_flow(PixelPolicy::open_trainable(model, lora, seed, dtype, device)?, options)?,
    })
}

/// Opens `model` for sampling with trained `weights` applied (a LoRA adapter, or for a diffusers
/// folder also a finetuned UNet or transformer).
pub fn open_frozen(model: &Path, weights: Option<&Path>, options: &OpenOptions, device: &Device) -> anyhow::Result<Box<dyn Family>> {
    Ok(match source(model)? {
        Source::SdPipeline => boxed(LatentPolicy::open_frozen(model, weights, options.dtype, device)?, options),
        Source::Sd3Pipeline => flow_options(Box::new(sd3::Sd3Policy::open_frozen(model, weights, options.dtype.dtype(), device)?), options)?,
        Source::Checkpoint => pixel_or_flow(PixelPolicy::open_frozen(model, weights, options.dtype, device)?, options)?,
    })
}

/// A flow model under `options`, which must not ask for DDIM's x0 clamp.
fn flow_options(policy: Box<dyn Family>, options: &OpenOptions) -> anyhow::Result<Box<dyn Family>> {
    anyhow::ensure!(options.clip_sample != Some(true), "--clip-sample is a DDIM setting; a flow model has no x0 clamp");
    Ok(policy)
}

/// A shapes-world checkpoint as its family: a flow model where its config has a `flow_shift`.
fn pixel_or_flow(policy: PixelPolicy, options: &OpenOptions) -> anyhow::Result<Box<dyn Family>> {
    if policy.0.config.flow_shift.is_some() {
        return flow_options(Box::new(flow::FlowPolicy::new(policy.0)?), options);
    }
    Ok(boxed(policy, options))
}

/// Checks that `dir` is a model folder some family opens (a diffusers pipeline), naming what is
/// missing otherwise; returns it absolute, so a run can find it again from anywhere.
pub fn check_model_dir(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let folder = sd::DiffusersFolder::open(dir)?;
    if let Source::Sd3Pipeline = source(dir)? {
        sd3::pipeline::check_folder(dir)?;
    }
    Ok(std::fs::canonicalize(&folder.dir)?)
}

fn boxed<T: unet::UNetFamily + 'static>(mut policy: T, options: &OpenOptions) -> Box<dyn Family> {
    if let Some(on) = options.clip_sample {
        policy.core_mut().set_clip_sample(on);
    }
    Box::new(policy)
}

/// How [`open_trainable`] / [`open_frozen`] load a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    pub lora: Option<crate::model::LoraConfig>,
    /// Seeds fresh LoRA adapters.
    pub seed: u64,
    /// The dtype of frozen weights.
    pub dtype: WeightDtype,
    /// Overrides the model's x0 clamp in the sampler (`None`: the model's own setting).
    pub clip_sample: Option<bool>,
}
