//! The diffusion policy: text encoder + UNet + noise schedule + tokenizer, behind the few
//! operations that sampling and training need (encode prompts, predict guided noise, list the
//! trainable weights). Loading and saving live in [`checkpoint`].

pub mod checkpoint;
pub mod init;

use candle_core::{Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::model::{Lora, LoraConfig, TextConfig, TextEncoder, UNet2DConditionModel, UNetConfig};
use crate::sampler::{NoiseSchedule, ScheduleConfig};
use crate::world::Tokenizer;

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
}

impl PolicyConfig {
    /// The embedded default: 32x32 pixel-space shapes-world model.
    pub fn shapes_default() -> Self {
        let tok = Tokenizer::shapes_world(16);
        Self {
            unet: UNetConfig::shapes_default(),
            text_encoder: TextConfig::shapes_default(tok.vocab_size(), 16),
            // Clamped x0 in sampling: without it the partly trained default drew saturated,
            // off-palette colours (background right 17% -> 40% at step 2400). Tiny test policies
            // leave it off: a model pretrained for a few dozen steps has nearly every x0 clamped,
            // which flips the sign of d(mean)/d(eps) and stalls DDPO on them.
            scheduler: ScheduleConfig { clip_sample: true, ..ScheduleConfig::pixel_default() },
            max_tokens: 16,
            image_size: 32,
            lora: None,
        }
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
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.unet.validate()?;
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

/// A text-conditioned diffusion policy ready to sample or train.
pub struct Policy {
    pub config: PolicyConfig,
    pub unet: UNet2DConditionModel,
    pub text: TextEncoder,
    pub tokenizer: Tokenizer,
    pub schedule: NoiseSchedule,
    /// The trainable variables, when the policy was built for training.
    pub varmap: Option<VarMap>,
    pub device: Device,
}

impl Policy {
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
        let unet = UNet2DConditionModel::new_with_lora(&config.unet, vb.pp("unet"), lora)?;
        let text = TextEncoder::new(&config.text_encoder, vb.pp("text_encoder"))?;
        Ok(Self {
            tokenizer: Tokenizer::shapes_world(config.max_tokens),
            schedule: NoiseSchedule::new(config.scheduler.clone())?,
            config,
            unet,
            text,
            varmap,
            device: device.clone(),
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
        let ids: Vec<u32> = prompts.iter().flat_map(|p| self.tokenizer.encode(p.as_ref())).collect();
        let ids = Tensor::from_vec(ids, (prompts.len(), self.config.max_tokens), &self.device)?;
        self.text.forward(&ids)
    }

    /// Classifier-free-guided noise prediction: eps_u + g (eps_c - eps_u), both in one UNet call.
    pub fn guided_eps(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        cond: &Tensor,
        uncond: &Tensor,
        guidance: f64,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        if guidance == 1.0 {
            let t = Tensor::from_vec(t, n, x.device())?;
            return self.unet.forward(x, &t, cond);
        }
        let t2 = Tensor::from_vec([t.clone(), t].concat(), 2 * n, x.device())?;
        let x2 = Tensor::cat(&[x, x], 0)?;
        let ctx = Tensor::cat(&[uncond, cond], 0)?;
        let eps = self.unet.forward(&x2, &t2, &ctx)?;
        let (eps_u, eps_c) = (eps.narrow(0, 0, n)?, eps.narrow(0, n, n)?);
        eps_u.clone() + ((eps_c - eps_u)? * guidance)?
    }

    /// Shape of one batch of the policy's samples.
    pub fn sample_shape(&self, n: usize) -> (usize, usize, usize, usize) {
        let s = self.config.image_size;
        (n, self.config.unet.in_channels, s, s)
    }
}
