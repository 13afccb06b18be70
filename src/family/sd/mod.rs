//! Stable Diffusion 1.x / 2.x from a diffusers pipeline folder (`--model-dir DIR`): the
//! folder's configs ([`folder`]), the CLIP BPE tokenizer, the VAE decoder, and the loading of
//! the UNet core with what trains ([`load`]). A latent family: its samples are VAE latents,
//! decoded to pixels for the reward.
//!
//! `tests/integration/golden_sd.rs` checks these pieces, and the whole guided DDIM policy path, against
//! diffusers and the DDPO reference on the tiny-sd fixture.

pub mod folder;
pub mod load;
pub mod random;
pub mod tokenizer;
pub mod vae;

use std::path::Path;

use candle_core::{Device, Result, Tensor};

pub use folder::DiffusersFolder;
pub use load::{read_metadata, Finetune};
pub use tokenizer::{ClipTokenizer, MAX_LEN};
pub use vae::{post_process, Vae, VaeConfig};

use super::unet::{Policy, PromptTokenizer, UNetFamily, WeightDtype};
use crate::model::LoraConfig;

/// A latent-space policy: the UNet core over VAE latents, and the VAE that decodes them.
pub struct LatentPolicy {
    pub policy: Policy,
    pub vae: Vae,
}

impl LatentPolicy {
    /// Opens the folder for training: its UNet in full, or fresh LoRA adapters (seeded).
    pub fn open_trainable(dir: &Path, lora: Option<LoraConfig>, seed: u64, dtype: WeightDtype, device: &Device) -> anyhow::Result<Self> {
        let finetune = match lora {
            Some(config) => Finetune::Lora { config, seed },
            None => Finetune::FullUnet,
        };
        Self::load(dir, finetune, dtype.dtype(), device)
    }

    /// Opens the folder for sampling, with trained `weights` (an adapter or a full UNet) applied.
    pub fn open_frozen(dir: &Path, weights: Option<&Path>, dtype: WeightDtype, device: &Device) -> anyhow::Result<Self> {
        match weights {
            Some(w) => Self::load_with_weights(dir, w, dtype.dtype(), device),
            None => Self::load(dir, Finetune::Frozen, dtype.dtype(), device),
        }
    }
}

impl UNetFamily for LatentPolicy {
    fn core(&self) -> &Policy {
        &self.policy
    }

    fn core_mut(&mut self) -> &mut Policy {
        &mut self.policy
    }

    fn sample_size(&self) -> usize {
        self.policy.config.unet.sample_size
    }

    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor> {
        self.vae.decode(samples)
    }

    fn pixel_range(&self) -> Option<f64> {
        None
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.policy.save(path)
    }
}

impl PromptTokenizer for ClipTokenizer {
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        ClipTokenizer::encode(self, text)
    }
}

/// Classifier-free guidance: `eps_uncond + scale * (eps_cond - eps_uncond)`.
pub fn guide(eps_uncond: &Tensor, eps_cond: &Tensor, scale: f64) -> Result<Tensor> {
    eps_uncond + ((eps_cond - eps_uncond)? * scale)?
}
