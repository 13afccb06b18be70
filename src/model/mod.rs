//! The diffusion policy's networks: Stable Diffusion v1's `UNet2DConditionModel` and a CLIP-style
//! text transformer, written in the candle-nn style (config struct, `new(cfg, vb)`, `forward`)
//! with diffusers' / transformers' tensor names, and every trained path differentiable.
//!
//! Owns architecture and configs; not sampling, RL, or file layout of checkpoints.

pub mod config;
pub mod embeddings;
pub mod layers;
pub mod lora;
pub mod resnet;
pub mod text;
pub mod transformer;
pub mod unet;

pub use config::{HeadDims, TextConfig, UNetConfig};
pub use embeddings::TextTimeEmbedding;
pub use lora::{Lora, LoraConfig};
pub use text::TextEncoder;
pub use unet::UNet2DConditionModel;
