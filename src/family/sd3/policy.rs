//! [`Sd3Policy`]: SD3 / SD3.5 as a [`Family`]. A latent flow model: the MMDiT predicts the
//! velocity over VAE latents, sampled with the flow family's steps (Flow-GRPO's SDE step or the
//! CPS step, each with its log-prob) on the sigmas of diffusers' scheduler, guided against the empty
//! prompt; the VAE turns final latents into images for the reward. The text encoders and the VAE
//! are frozen; the transformer trains through LoRA adapters (whose switched-off base is the KL
//! reference) or in full.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;

use super::text::Sd3TextEncoders;
use super::Sd3Transformer;
use crate::family::flow::FlowSchedule;
use crate::family::sd::{guide, Vae};
use crate::family::{Conditioning, Family, NoiseRng, SamplerConfig, StepOutput};
use crate::kernels::no_grad::with_no_grad;
use crate::model::LoraConfig;

/// The trainable part of the transformer.
pub enum Trainable {
    Frozen,
    /// LoRA adapters, their variables named `transformer.<module>.lora_A.weight` / `lora_B.weight`.
    Lora(LoraConfig, VarMap),
    /// Every weight, its variables under diffusers' names (without the `transformer.` prefix).
    Full(VarMap),
}

/// A Stable Diffusion 3 / 3.5 pipeline as a policy.
pub struct Sd3Policy {
    pub transformer: Sd3Transformer,
    pub text: Sd3TextEncoders,
    pub vae: Vae,
    pub schedule: FlowSchedule,
    pub trainable: Trainable,
    /// The dtype the transformer computes in (that of its base weights).
    pub dtype: DType,
    pub device: Device,
    /// The pipeline folder, absolute (saved beside trained weights).
    pub dir: PathBuf,
}

/// Text states (cond, pooled cond, uncond, pooled uncond) of a batch.
struct Texts<'a>([&'a Tensor; 4]);

impl Sd3Policy {
    /// The transformer's text inputs for `prompts` and for as many empty prompts, without gradients
    /// (the text encoders are frozen).
    fn texts(&self, prompts: &[String]) -> Result<Conditioning> {
        with_no_grad(|| {
            let (cond, pooled) = self.text.encode(prompts, &self.device)?;
            let (uncond, pooled_uncond) = self.text.encode(&vec![""; prompts.len()], &self.device)?;
            Ok(Conditioning(vec![cond.detach(), pooled.detach(), uncond.detach(), pooled_uncond.detach()]))
        })
    }

    /// Unguided velocity for latents `x` at `times` (1000 sigma per row), in f32.
    fn predict(&self, x: &Tensor, times: &[f32], context: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let t = Tensor::from_vec(times.to_vec(), times.len(), x.device())?;
        let dt = self.dtype;
        self.transformer.forward(&x.to_dtype(dt)?, &t, &context.to_dtype(dt)?, &pooled.to_dtype(dt)?)?.to_dtype(DType::F32)
    }

    /// Classifier-free-guided velocity: v_u + g (v_c - v_u), both in one transformer call.
    fn guided(&self, x: &Tensor, times: &[f32], texts: Texts, guidance: f64) -> Result<Tensor> {
        let [cond, pooled, uncond, pooled_uncond] = texts.0;
        if guidance == 1.0 {
            return self.predict(x, times, cond, pooled);
        }
        let n = x.dim(0)?;
        let two = |u: &Tensor, c: &Tensor| Tensor::cat(&[u, c], 0);
        let v = self.predict(&two(x, x)?, &[times, times].concat(), &two(uncond, cond)?, &two(pooled_uncond, pooled)?)?;
        guide(&v.narrow(0, 0, n)?, &v.narrow(0, n, n)?, guidance)
    }
}

/// The conditioning's four tensors.
fn texts(cond: &Conditioning) -> Result<Texts<'_>> {
    match &cond.0[..] {
        [c, p, u, pu] => Ok(Texts([c, p, u, pu])),
        _ => candle_core::bail!("the SD3 family's conditioning is (cond, pooled, uncond, pooled uncond)"),
    }
}

impl Family for Sd3Policy {
    fn device(&self) -> &Device {
        &self.device
    }

    fn check_sampler(&self, cfg: &SamplerConfig) -> anyhow::Result<()> {
        self.schedule.check_sampler(cfg)
    }

    fn eval_sampler(&self) -> SamplerConfig {
        FlowSchedule::eval_sampler()
    }

    fn timesteps(&self, steps: usize) -> Vec<usize> {
        self.schedule.timesteps(steps)
    }

    fn step_sigma(&self, label: usize, cfg: &SamplerConfig) -> f64 {
        self.schedule.step_sigma(label, cfg)
    }

    fn sample_shape(&self, n: usize) -> Vec<usize> {
        let cfg = &self.transformer.config;
        vec![n, cfg.in_channels, cfg.sample_size, cfg.sample_size]
    }

    fn condition(&self, prompts: &[String]) -> Result<Conditioning> {
        self.texts(prompts)
    }

    fn step(&self, cond: &Conditioning, x_t: &Tensor, labels: &[usize], cfg: &SamplerConfig, noise: &Tensor) -> Result<StepOutput> {
        let k = self.schedule.batch_index(labels, cfg.steps)?;
        let s = self.schedule.sigmas(cfg.steps)[k];
        let times = vec![(1000.0 * s) as f32; x_t.dim(0)?];
        let v = with_no_grad(|| self.guided(x_t, &times, texts(cond)?, cfg.guidance))?.detach();
        self.schedule.step(x_t, &v, k, cfg, noise)
    }

    fn log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, labels: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        let cond = self.texts(prompts)?;
        // Samples of a minibatch may sit at different steps: one pass at each row's own time.
        let (ks, s) = self.schedule.row_sigmas(labels, cfg.steps)?;
        let times: Vec<f32> = s.iter().map(|&s| (1000.0 * s) as f32).collect();
        let x = x_t.detach();
        let v = self.guided(&x, &times, texts(&cond)?, cfg.guidance)?;
        self.schedule.recompute(&x, &v, x_prev, &ks, cfg)
    }

    fn has_own_reference(&self) -> bool {
        matches!(self.trainable, Trainable::Lora(..))
    }

    fn reference_log_prob(&self, prompts: &[String], x_t: &Tensor, x_prev: &Tensor, labels: &[usize], cfg: &SamplerConfig) -> Result<StepOutput> {
        crate::family::adapters_off_step(self.has_own_reference(), || self.log_prob(prompts, x_t, x_prev, labels, cfg))
    }

    fn denoising_loss(&self, x0: &Tensor, prompts: &[String], rng: &mut NoiseRng) -> Result<Tensor> {
        let cond = self.texts(prompts)?;
        let Texts([context, pooled, ..]) = texts(&cond)?;
        self.schedule.denoising_loss(x0, rng, |x_s, times| self.predict(x_s, times, context, pooled))
    }

    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor> {
        self.vae.decode(samples)
    }

    fn pixel_range(&self) -> Option<f64> {
        None
    }

    fn x0_weight(&self, label: usize) -> f64 {
        FlowSchedule::x0_weight(label)
    }

    /// Named as they are saved: adapters `transformer.<module>.lora_A.weight`, full weights
    /// `transformer.<diffusers name>`.
    fn trainable_vars(&self) -> Vec<(String, Var)> {
        let (varmap, prefix) = match &self.trainable {
            Trainable::Frozen => return Vec::new(),
            Trainable::Lora(_, varmap) => (varmap, ""),
            Trainable::Full(varmap) => (varmap, "transformer."),
        };
        let data = varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<_> = data.iter().map(|(n, v)| (format!("{prefix}{n}"), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.save_weights(path)
    }
}
