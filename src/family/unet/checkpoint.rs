//! Policy weights on disk: `NAME.safetensors` (tensors named `unet.*` and `text_encoder.*`, as in
//! diffusers' folders) with `NAME.json` (the [`PolicyConfig`]) beside it. Loading memory-maps the
//! file; writing goes through a temporary file and a rename so a crash never leaves half a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::io::{save_tensors_atomic_with_metadata, write_atomic};

use anyhow::Context;
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::{Policy, PolicyConfig};
use crate::model::LoraConfig;

/// Safetensors metadata keys of an adapter file (strings, as safetensors metadata must be).
pub const META_RANK: &str = "lora_rank";
pub const META_ALPHA: &str = "lora_alpha";
pub const META_TARGETS: &str = "target_modules";
/// The modules that carry adapters, as peft's `target_modules`.
pub const LORA_TARGETS: &str = "to_q,to_k,to_v,to_out.0";

/// The JSON config that belongs to a weights file.
pub fn config_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// Reads and validates the config beside `weights`.
pub fn load_config(weights: &Path) -> anyhow::Result<PolicyConfig> {
    let path = config_path(weights);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cannot read model config {} (it must sit next to the weights file)", path.display())
    })?;
    let config: PolicyConfig = serde_json::from_str(&text)
        .with_context(|| format!("model config {} is not a valid policy config", path.display()))?;
    config.validate().with_context(|| format!("in {}", path.display()))?;
    Ok(config)
}

fn open_weights(weights: &Path) -> anyhow::Result<MmapedSafetensors> {
    anyhow::ensure!(
        weights.exists(),
        "model weights {} not found (run `ddpo pretrain diffusion` or pass --model PATH)",
        weights.display()
    );
    // SAFETY: the file is only read; a concurrent writer replaces it by rename, never in place.
    unsafe { MmapedSafetensors::new(weights) }
        .with_context(|| format!("{} is not a readable safetensors file (corrupt or truncated?)", weights.display()))
}

impl Policy {
    /// Loads a frozen policy for sampling (weights memory-mapped).
    pub fn load(weights: &Path, device: &Device) -> anyhow::Result<Self> {
        open_weights(weights)?;
        let config = load_config(weights)?;
        // SAFETY: as in `open_weights`.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device) }?;
        Self::from_var_builder(config, vb, None, device)
            .with_context(|| format!("{} does not match its config", weights.display()))
    }

    /// Loads a policy whose weights are trainable variables.
    pub fn load_trainable(weights: &Path, device: &Device) -> anyhow::Result<Self> {
        let st = open_weights(weights)?;
        let config = load_config(weights)?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, _) in st.tensors() {
                let t = st.load(&name, device)?.to_dtype(DType::F32)?;
                data.insert(name, Var::from_tensor(&t)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let policy = Self::from_var_builder(config, vb, Some(varmap), device)
            .with_context(|| format!("{} does not match its config", weights.display()))?;
        let expected = policy.trainable_vars().len();
        let found = st.tensors().len();
        anyhow::ensure!(
            expected == found,
            "{} holds {found} tensors but the config's architecture has {expected}",
            weights.display()
        );
        Ok(policy)
    }

    /// Loads frozen base weights and attaches fresh LoRA adapters (seeded) as the only trainable
    /// variables.
    pub fn load_with_new_lora(weights: &Path, lora: LoraConfig, seed: u64, device: &Device) -> anyhow::Result<Self> {
        open_weights(weights)?;
        let config = load_config(weights)?;
        anyhow::ensure!(config.lora.is_none(), "{} is already a LoRA adapter; pass its base model", weights.display());
        // SAFETY: as in `open_weights`.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device) }?;
        Self::with_lora(config, vb, lora, seed, device)
            .with_context(|| format!("{} does not match its config", weights.display()))
    }

    /// Loads a base model with a trained LoRA adapter (saved by a LoRA training run).
    pub fn load_with_adapter(base: &Path, adapter: &Path, device: &Device) -> anyhow::Result<Self> {
        let st = open_weights(adapter)?;
        let lora = load_config(adapter)?
            .lora
            .with_context(|| format!("{} is not a LoRA adapter (its config has no lora field)", adapter.display()))?;
        let policy = Self::load_with_new_lora(base, lora, 0, device)?;
        for (name, var) in policy.trainable_vars() {
            let t = st.load(&name, device).with_context(|| format!("adapter {} lacks tensor {name}", adapter.display()))?;
            anyhow::ensure!(
                t.dims() == var.dims(),
                "adapter tensor {name} has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            );
            var.set(&t)?;
        }
        Ok(policy)
    }

    /// Saves the current weights (and config) atomically.
    pub fn save(&self, weights: &Path) -> anyhow::Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        save_weights(&self.config, &tensors, weights)
    }
}

/// Writes `tensors` as a policy checkpoint with its config, atomically. An adapter also records
/// its rank, alpha and target modules in the safetensors metadata, so the file alone says how to
/// apply it.
pub fn save_weights(config: &PolicyConfig, tensors: &[(String, Tensor)], weights: &Path) -> anyhow::Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(lora) = config.lora {
        meta.insert(META_RANK.into(), lora.rank.to_string());
        meta.insert(META_ALPHA.into(), lora.alpha.to_string());
        meta.insert(META_TARGETS.into(), LORA_TARGETS.into());
    }
    save_tensors_atomic_with_metadata(&map, Some(meta), weights)?;
    let json = serde_json::to_string_pretty(config)?;
    write_atomic(&config_path(weights), json.as_bytes())
}
