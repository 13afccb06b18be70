//! The embedded default family: a pixel-space UNet over the shapes world (our own checkpoint
//! files, `NAME.safetensors` + `NAME.json`). Its samples are the images; the x0 clamp and the
//! range penalty keep them inside the pixel range.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::unet::{Policy, UNetFamily, WeightDtype};
use crate::model::LoraConfig;

/// A pixel-space policy: the UNet core whose samples are images.
pub struct PixelPolicy(pub Policy);

impl PixelPolicy {
    /// Opens a checkpoint file for training; with `lora`, fresh adapters (seeded) are the only
    /// trainable weights.
    pub fn open_trainable(model: &Path, lora: Option<LoraConfig>, seed: u64, dtype: WeightDtype, device: &Device) -> anyhow::Result<Self> {
        check_dtype(model, dtype)?;
        Ok(Self(match lora {
            Some(lora) => Policy::load_with_new_lora(model, lora, seed, device)?,
            None => Policy::load_trainable(model, device)?,
        }))
    }

    /// Opens a checkpoint file for sampling, with a trained LoRA `adapter` applied.
    pub fn open_frozen(model: &Path, adapter: Option<&Path>, dtype: WeightDtype, device: &Device) -> anyhow::Result<Self> {
        check_dtype(model, dtype)?;
        Ok(Self(match adapter {
            Some(adapter) => Policy::load_with_adapter(model, adapter, device)?,
            None => Policy::load(model, device)?,
        }))
    }
}

impl UNetFamily for PixelPolicy {
    fn core(&self) -> &Policy {
        &self.0
    }

    fn core_mut(&mut self) -> &mut Policy {
        &mut self.0
    }

    fn sample_size(&self) -> usize {
        self.0.config.image_size
    }

    fn decode(&self, samples: &Tensor) -> anyhow::Result<Tensor> {
        Ok(samples.clone())
    }

    fn pixel_range(&self) -> Option<f64> {
        Some(self.0.schedule.config.clip_sample_range)
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.0.save(path)
    }
}

/// The embedded default is small and CPU-bound: it only runs in f32.
fn check_dtype(model: &Path, dtype: WeightDtype) -> anyhow::Result<()> {
    anyhow::ensure!(
        dtype == WeightDtype::F32,
        "weights dtype {dtype:?} applies to diffusers folders only; {} runs in f32",
        model.display()
    );
    Ok(())
}
