//! Stable Diffusion 3 / 3.5: the MMDiT transformer (diffusers' `SD3Transformer2DModel`), a
//! rectified-flow model whose output is the velocity, differentiable end to end for training;
//! and the whole pipeline as a policy ([`Sd3Policy`]).
//!
//! - [`config`] reads `transformer/config.json`.
//! - [`embed`] holds the patch and position embedding, and the timestep and pooled-text conditioning.
//! - [`block`] is one joint block (adaptive norms, joint attention, QK RMSNorm, MMDiT-X).
//! - [`transformer`] is the whole model, and [`load`] loads it from a diffusers folder.
//! - [`text`] is the frozen text conditioning (two CLIP encoders with projection, T5 zeros).
//! - [`pipeline`] reads a `StableDiffusion3Pipeline` folder and saves trained weights;
//!   [`policy`] is the [`Family`](crate::family::Family) over it.
//!
//! `tests/integration/sd3.rs` checks the transformer against diffusers on the tiny-sd3 fixture,
//! `tests/integration/sd3_pipeline.rs` the pipeline on tiny-sd3-pipeline.

pub mod block;
pub mod config;
pub mod embed;
pub mod load;
pub mod pipeline;
pub mod policy;
pub mod text;
pub mod transformer;

pub use config::Sd3Config;
pub use pipeline::Finetune;
pub use policy::Sd3Policy;
pub use transformer::Sd3Transformer;
