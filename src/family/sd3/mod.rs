//! Stable Diffusion 3 / 3.5: the MMDiT transformer (diffusers' `SD3Transformer2DModel`), a
//! rectified-flow model whose output is the velocity. Differentiable end to end, for training.
//!
//! - [`config`] reads `transformer/config.json`.
//! - [`embed`] holds the patch and position embedding, and the timestep and pooled-text conditioning.
//! - [`block`] is one joint block (adaptive norms, joint attention, QK RMSNorm, MMDiT-X).
//! - [`transformer`] is the whole model, and [`load`] loads it from a diffusers folder.
//!
//! `tests/sd3.rs` checks it against diffusers on the tiny-sd3 fixture.

pub mod block;
pub mod config;
pub mod embed;
pub mod load;
pub mod transformer;

pub use config::Sd3Config;
pub use transformer::Sd3Transformer;
