//! LoRA adapters (Hu et al. 2021) on linear layers: y = W x + (alpha / r) * B (A x), with A
//! (r x in) and B (out x r) trained while W stays frozen. Tensor names follow the peft / diffusers
//! convention (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`) so other tools load our adapters.
//! B starts at zero, so attaching an adapter leaves the model's output unchanged.

use std::cell::Cell;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::Linear;
use serde::{Deserialize, Serialize};

thread_local! {
    /// Set while sampling: adapters act as constants, so no autograd graph is kept.
    static DETACHED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every adapter detached from the autograd graph (PyTorch's `no_grad` for LoRA).
///
/// The adapters are the only variables of a LoRA policy; while they are attached, each UNet
/// forward pass keeps every intermediate tensor alive for a backward pass that sampling never
/// runs, which on Stable Diffusion is the memory of a training step. Values are unchanged.
pub fn with_adapters_detached<T>(f: impl FnOnce() -> T) -> T {
    with_adapters_detached_if(true, f)
}

/// Runs `f` with the adapters detached if `detached` (else as they are on this thread): how
/// work handed to another thread keeps the caller's setting.
pub fn with_adapters_detached_if<T>(detached: bool, f: impl FnOnce() -> T) -> T {
    let before = DETACHED.with(|d| d.replace(detached || d.get()));
    let out = f();
    DETACHED.with(|d| d.set(before));
    out
}

/// Whether adapters are detached on this thread.
pub fn adapters_detached() -> bool {
    DETACHED.with(Cell::get)
}

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
            Some((down, up)) => {
                // Adapters stay f32 (trained) while frozen weights may be f16/bf16: run the
                // adapter in f32 and add it in the base's dtype (both casts are no-ops in f32).
                let (down, up) = if DETACHED.with(Cell::get) {
                    (Linear::new(down.weight().detach(), None), Linear::new(up.weight().detach(), None))
                } else {
                    (down.clone(), up.clone())
                };
                let delta = up.forward(&down.forward(&x.to_dtype(DType::F32)?)?)?;
                y + (delta * self.scale)?.to_dtype(x.dtype())?
            }
            None => Ok(y),
        }
    }
}
