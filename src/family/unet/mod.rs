//! The UNet core both epsilon-predicting families share: text encoder + UNet + DDPM noise
//! schedule + a prompt tokenizer ([`Policy`]), its checkpoints and seeded initialisation, and the
//! [`Family`] implementation for every family built on it ([`UNetFamily`]): guided noise
//! prediction turned into DDIM steps with log-probs, and the denoising loss.

pub mod checkpoint;
mod family;
pub mod init;

use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::ddpm::{NoiseSchedule, ScheduleConfig};
use crate::model::{Lora, LoraConfig, TextConfig, TextEncoder, UNet2DConditionModel, UNetConfig};
use crate::world::Tokenizer;

pub use family::UNetFamily;

/// Everything that defines a policy's architecture; saved as JSON next to its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyConfig {
    pub unet: UNetConfig,
    pub text_encoder: TextConfig,
    pub scheduler: ScheduleConfig,
    /// Token sequence length of the shapes-world tokenizer.
    pub max_tokens: usize,
    /// Side of the square images the policy generates, in pixels.
    pub image_size: usize,
    /// LoRA adapters on the UNet's attention projections, when the policy carries them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// The diffusers folder whose UNet these weights finetune (absent for the embedded default):
    /// such a checkpoint is applied to its folder with `--model-dir DIR --lora FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusers_dir: Option<PathBuf>,
    /// A rectified flow's velocity is what the UNet predicts (the flow family), with this
    /// sigma-schedule shift; absent: the noise (DDPM / DDIM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_shift: Option<f64>,
}

impl PolicyConfig {
    /// The embedded default: 32x32 pixel-space shapes-world model.
    pub fn shapes_default() -> Self {
        let tok = Tokenizer::shapes_world(16);
        Self {
            unet: UNetConfig::shapes_default(),
            text_encoder: TextConfig::shapes_default(tok.vocab_size(), 16),
            // Clamped x0 in sampling keeps a small model's early steps in the palette. Tiny test
            // policies leave it off: with nearly every x0 clamped, DDPO cannot move them.
            scheduler: ScheduleConfig { clip_sample: true, ..ScheduleConfig::pixel_default() },
            max_tokens: 16,
            image_size: 32,
            lora: None,
            diffusers_dir: None,
            flow_shift: None,
        }
    }

    /// v1 with attention at 16x16 (see [`UNetConfig::shapes_v3`]), v-prediction, unclamped.
    pub fn shapes_v3() -> Self {
        let mut config = Self::shapes_default();
        config.unet = UNetConfig::shapes_v3();
        config.scheduler.prediction_type = "v_prediction".into();
        config.scheduler.clip_sample = false;
        config
    }

    /// v3 plus the pooled caption in the timestep embedding (see [`UNetConfig::shapes_v4`]).
    pub fn shapes_v4() -> Self {
        Self { unet: UNetConfig::shapes_v4(), ..Self::shapes_v3() }
    }

    /// The v2 candidate's architecture (see [`UNetConfig::shapes_v2`]), with a
    /// three-layer text encoder so that colour words can bind to the shape words after them.
    pub fn shapes_v2() -> Self {
        let mut config = Self::shapes_default();
        config.unet = UNetConfig::shapes_v2();
        config.text_encoder.num_hidden_layers = 3;
        config
    }

    /// A tiny policy for tests: 16x16 images, a few thousand parameters per block.
    pub fn tiny_test() -> Self {
        let tok = Tokenizer::shapes_world(8);
        let mut text = TextConfig::shapes_default(tok.vocab_size(), 8);
        text.hidden_size = 32;
        text.intermediate_size = 64;
        text.num_hidden_layers = 1;
        text.num_attention_heads = 2;
        Self {
            unet: UNetConfig::tiny_test(),
            text_encoder: text,
            scheduler: ScheduleConfig::pixel_default(),
            max_tokens: 8,
            image_size: 16,
            lora: None,
            diffusers_dir: None,
            flow_shift: None,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.unet.validate()?;
        if let Some(shift) = self.flow_shift {
            anyhow::ensure!(shift > 0.0 && shift.is_finite(), "policy config: flow_shift must be a positive number, got {shift}");
        }
        anyhow::ensure!(
            self.unet.cross_attention_dim == self.text_encoder.hidden_size,
            "policy config: unet.cross_attention_dim {} must equal text_encoder.hidden_size {}",
            self.unet.cross_attention_dim,
            self.text_encoder.hidden_size
        );
        anyhow::ensure!(
            self.max_tokens <= self.text_encoder.max_position_embeddings,
            "policy config: max_tokens {} exceeds text_encoder.max_position_embeddings {}",
            self.max_tokens,
            self.text_encoder.max_position_embeddings
        );
        Ok(())
    }
}

/// How prompts become token ids (the shapes world's word tokenizer, Stable Diffusion's CLIP BPE).
pub trait PromptTokenizer: Send + Sync {
    /// Token ids of `text`, padded to the encoder's sequence length.
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>>;
}

impl PromptTokenizer for Tokenizer {
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(Tokenizer::encode(self, text))
    }
}

/// The dtype of frozen weights (`--dtype`). Trained weights (LoRA adapters, or the UNet when
/// finetuned in full) and the sampler's latents and log-probs always stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }
}

/// A text-conditioned diffusion policy ready to sample or train.
pub struct Policy {
    pub config: PolicyConfig,
    pub unet: UNet2DConditionModel,
    pub text: TextEncoder,
    pub tokenizer: Box<dyn PromptTokenizer>,
    pub schedule: NoiseSchedule,
    /// The trainable variables, when the policy was built for training.
    pub varmap: Option<VarMap>,
    pub device: Device,
    /// The dtype the UNet computes in (that of its base weights).
    pub unet_dtype: DType,
}

impl Policy {
    /// Turns the sampler's x0 clamp (diffusers' `clip_sample`) on or off, overriding the model's
    /// scheduler config; checkpoints saved afterwards record the new setting.
    pub fn set_clip_sample(&mut self, on: bool) {
        self.config.scheduler.clip_sample = on;
        self.schedule.config.clip_sample = on;
    }

    /// Builds the networks from `vb`; `varmap` is kept when the weights are trainable.
    pub fn from_var_builder(
        config: PolicyConfig,
        vb: VarBuilder,
        varmap: Option<VarMap>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        Self::build(config, vb, None, varmap, device)
    }

    fn build(
        config: PolicyConfig,
        vb: VarBuilder,
        lora: Option<&Lora>,
        varmap: Option<VarMap>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        anyhow::ensure!(
            config.diffusers_dir.is_none(),
            "these weights finetune the diffusers folder {}: load them with --model-dir that folder and --lora the weights file",
            config.diffusers_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default()
        );
        let unet = UNet2DConditionModel::new_with_lora(&config.unet, vb.pp("unet"), lora)?;
        let text = TextEncoder::new(&config.text_encoder, vb.pp("text_encoder"))?;
        Ok(Self {
            tokenizer: Box::new(Tokenizer::shapes_world(config.max_tokens)),
            schedule: NoiseSchedule::new(config.scheduler.clone())?,
            config,
            unet,
            text,
            varmap,
            device: device.clone(),
            unet_dtype: DType::F32,
        })
    }

    /// A freshly initialised, trainable policy (the start of pretraining); same seed, same weights.
    pub fn new_random(config: PolicyConfig, seed: u64, device: &Device) -> anyhow::Result<Self> {
        let varmap = VarMap::new();
        let vb = init::seeded_var_builder(&varmap, seed, device);
        Self::from_var_builder(config, vb, Some(varmap.clone()), device)
    }

    /// A policy whose base weights (from `vb`) stay frozen and whose only trainable variables
    /// are LoRA adapters on the UNet's attention projections, initialised from `seed`.
    pub fn with_lora(mut config: PolicyConfig, vb: VarBuilder, lora: LoraConfig, seed: u64, device: &Device) -> anyhow::Result<Self> {
        anyhow::ensure!(lora.rank > 0, "LoRA rank must be at least 1");
        config.lora = Some(lora);
        let varmap = VarMap::new();
        let adapters = Lora::new(lora, init::seeded_var_builder(&varmap, seed, device));
        Self::build(config, vb, Some(&adapters), Some(varmap), device)
    }

    /// The trainable variables, sorted by name (empty for a frozen policy).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let Some(varmap) = &self.varmap else { return Vec::new() };
        let mut vars: Vec<_> = varmap.data().lock().expect("varmap lock").clone().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Number of parameters of the UNet and the text encoder.
    pub fn parameter_count(&self) -> usize {
        self.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Text states (B, L, D) for `prompts`; the empty prompt is the unconditional one.
    pub fn encode_prompts<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len() * self.config.max_tokens);
        for p in prompts {
            ids.extend(self.tokenizer.encode(p.as_ref()).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?);
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), self.config.max_tokens), &self.device)?;
        self.text.forward(&ids)
    }

    /// Unguided noise prediction for `x` at `timesteps` given text states `context`, in f32
    /// whatever the weights' dtype (converted from v for a v-prediction model).
    pub fn predict_eps(&self, x: &Tensor, timesteps: &[usize], context: &Tensor) -> Result<Tensor> {
        let out = self.predict(x, &timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), context)?;
        self.schedule.eps_from_output(out, x, timesteps)
    }

    /// The UNet's prediction (noise, or a flow's velocity) at continuous `times` (a flow's
    /// timestep is 1000 * sigma), in f32.
    ///
    /// On the CPU the batch runs in one shard per core ([`crate::kernels::shards`]).
    pub fn predict(&self, x: &Tensor, times: &[f32], context: &Tensor) -> Result<Tensor> {
        let ranges = crate::kernels::shards::split(x.dim(0)?, &self.device);
        if ranges.len() > 1 {
            let parts = crate::kernels::shards::map_shards(&ranges, |r| {
                let rows = |t: &Tensor| t.narrow(0, r.start, r.len());
                self.predict(&rows(x)?, &times[r.clone()], &rows(context)?)
            });
            return Tensor::cat(&parts.into_iter().collect::<Result<Vec<_>>>()?, 0);
        }
        let t = Tensor::from_vec(times.to_vec(), times.len(), x.device())?;
        let dt = self.unet_dtype;
        self.unet.forward(&x.to_dtype(dt)?, &t, &context.to_dtype(dt)?)?.to_dtype(DType::F32)
    }

    /// Classifier-free-guided noise prediction: eps_u + g (eps_c - eps_u), both in one UNet call
    /// (guiding v and converting is the same: eps is affine in v at a given x_t).
    pub fn guided_eps(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        cond: &Tensor,
        uncond: &Tensor,
        guidance: f64,
    ) -> Result<Tensor> {
        let out = self.guided(x, &timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), cond, uncond, guidance)?;
        self.schedule.eps_from_output(out, x, timesteps)
    }

    /// Classifier-free guidance of [`Policy::predict`] at continuous `times`.
    pub fn guided(&self, x: &Tensor, times: &[f32], cond: &Tensor, uncond: &Tensor, guidance: f64) -> Result<Tensor> {
        let n = x.dim(0)?;
        if guidance == 1.0 {
            return self.predict(x, times, cond);
        }
        let x2 = Tensor::cat(&[x, x], 0)?;
        let ctx = Tensor::cat(&[uncond, cond], 0)?;
        let eps = self.predict(&x2, &[times, times].concat(), &ctx)?;
        let (eps_u, eps_c) = (eps.narrow(0, 0, n)?, eps.narrow(0, n, n)?);
        eps_u.clone() + ((eps_c - eps_u)? * guidance)?
    }
}
