//! LoRA adapters (Hu et al. 2021) on linear layers: y = W x + (alpha / r) * B (A x), with A
//! (r x in) and B (out x r) trained while W stays frozen. Tensor names follow the peft / diffusers
//! convention (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`) so other tools load our adapters.
//! B starts at zero, so attaching an adapter leaves the model's output unchanged.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::Linear;
use serde::{Deserialize, Serialize};

/// Rank and scale of the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
}

impl Default for LoraConfig {
    /// TRL's DDPO default: rank 4, alpha 4.
    fn default() -> Self {
        Self { rank: 4, alpha: 4.0 }
    }
}

/// Where adapters are created: the config and a VarBuilder at the checkpoint root for the adapter
/// variables (separate from the frozen base weights).
#[derive(Clone)]
pub struct Lora {
    pub config: LoraConfig,
    vb: VarBuilder<'static>,
}

impl Lora {
    pub fn new(config: LoraConfig, vb: VarBuilder<'static>) -> Self {
        Self { config, vb }
    }

    /// Wraps `base` (built at `base_vb`) with an adapter named after it.
    pub fn wrap(&self, base: Linear, in_dim: usize, out_dim: usize, base_vb: &VarBuilder) -> Result<LoraLinear> {
        let vb = self.vb.pp(base_vb.prefix());
        let r = self.config.rank;
        let down = vb.get_with_hints((r, in_dim), "lora_A.weight", candle_nn::init::DEFAULT_KAIMING_UNIFORM)?;
        let up = vb.get_with_hints((out_dim, r), "lora_B.weight", Init::Const(0.0))?;
        Ok(LoraLinear {
            base,
            adapter: Some((Linear::new(down, None), Linear::new(up, None))),
            scale: self.config.alpha / r as f64,
        })
    }
}

/// A linear layer with an optional low-rank adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    adapter: Option<(Linear, Linear)>,
    scale: f64,
}

impl LoraLinear {
    /// A plain linear layer (no adapter).
    pub fn plain(base: Linear) -> Self {
        Self { base, adapter: None, scale: 0.0 }
    }

    /// Builds `base` at `vb` and, when `lora` is given, an adapter for it.
    pub fn build(base: Linear, in_dim: usize, out_dim: usize, vb: &VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        match lora {
            Some(l) => l.wrap(base, in_dim, out_dim, vb),
            None => Ok(Self::plain(base)),
        }
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.adapter {
            // Switched off (`kernels::no_grad::without_adapters`): the frozen base, the KL reference.
            Some((down, up)) if !crate::kernels::no_grad::adapters_off() => {
                // Adapters stay f32 (trained) while frozen weights may be f16/bf16: run the
                // adapter in f32 and add it in the base's dtype (both casts are no-ops in f32).
                let (down, up) = if crate::kernels::no_grad::no_grad() {
                    (Linear::new(down.weight().detach(), None), Linear::new(up.weight().detach(), None))
                } else {
                    (down.clone(), up.clone())
                };
                let delta = up.forward(&down.forward(&x.to_dtype(DType::F32)?)?)?;
                y + (delta * self.scale)?.to_dtype(x.dtype())?
            }
            _ => Ok(y),
        }
    }
}
