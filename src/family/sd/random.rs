//! Seeded random weights for a diffusers folder that has only its configs and tokenizer: the
//! way to time a model of a real size (Stable Diffusion 1.5's UNet from its `unet/config.json`)
//! without downloading its weights. The tensors get the names and shapes diffusers and
//! transformers save, so PyTorch loads the same folder (`benches/gpu/ddpo_torch.py`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::folder::{self, DiffusersFolder};
use super::vae::{self, VaeConfig};
use crate::family::unet::init::seeded_var_builder;
use crate::model::{TextEncoder, UNet2DConditionModel};

/// Parameter counts of the weights written.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RandomWeights {
    pub unet: usize,
    pub text_encoder: usize,
    pub vae_decoder: usize,
}

/// Writes the UNet, text encoder and VAE decoder of the folder `dir` with weights drawn from
/// `seed` (layers' usual initialisations: Kaiming-uniform convolutions and linears, unit norms),
/// refusing a folder that already has weights. The VAE gets its decoder only: the encoder is
/// never used by sampling or DDPO.
pub fn write_random_weights(dir: &Path, seed: u64) -> anyhow::Result<RandomWeights> {
    let folder = DiffusersFolder::open(dir)?;
    let vae_weights = dir.join(folder::VAE_DIR).join(vae::WEIGHTS);
    for weights in [dir.join(folder::UNET_WEIGHTS), dir.join(folder::TEXT_WEIGHTS), vae_weights.clone()] {
        anyhow::ensure!(!weights.exists(), "{} exists: --random-weights fills a folder that has configs and no weights", weights.display());
    }
    let unet_cfg = folder.unet_config()?;
    let unet = write_seeded(&dir.join(folder::UNET_WEIGHTS), seed, |vb| UNet2DConditionModel::new(&unet_cfg, vb).map(drop))?;
    let text_cfg = folder.text_config()?;
    let text_encoder = write_seeded(&dir.join(folder::TEXT_WEIGHTS), seed, |vb| TextEncoder::new(&text_cfg, vb).map(drop))?;
    let vae_cfg = VaeConfig::from_file(&dir.join(folder::VAE_DIR).join(vae::CONFIG))?;
    let vae_decoder = write_seeded(&vae_weights, seed, |vb| vae::build_decoder(&vae_cfg, vb))?;
    Ok(RandomWeights { unet, text_encoder, vae_decoder })
}

/// Builds a model with `build` on seeded fresh variables and saves them to `path`; returns the
/// parameter count.
fn write_seeded(path: &Path, seed: u64, build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>) -> anyhow::Result<usize> {
    let varmap = VarMap::new();
    build(seeded_var_builder(&varmap, seed, &Device::Cpu)).with_context(|| format!("building the model of {}", path.display()))?;
    let tensors: HashMap<String, Tensor> = varmap.data().lock().expect("varmap lock").iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    let count = tensors.values().map(Tensor::elem_count).sum();
    crate::io::save_tensors_atomic(&tensors, path)?;
    Ok(count)
}
