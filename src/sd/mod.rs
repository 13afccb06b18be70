//! Real Stable Diffusion pieces from a diffusers pipeline folder, beyond the UNet and text encoder
//! that [`crate::model`] already loads: the CLIP BPE tokenizer that turns prompts into the ids the
//! text encoder expects, and the VAE that turns final latents into images for the reward.
//!
//! [`folder`] reads a diffusers pipeline folder's configs; `crate::policy` assembles the policy
//! from them.
//!
//! Kept apart from [`crate::world`] (the shapes world's own tokenizer) and [`crate::model`]
//! (trainable networks) because these pieces are fixed: DDPO never trains them.
//! `tests/golden_sd.rs` checks them, and the whole guided DDIM policy path, against diffusers and
//! the DDPO reference on the tiny-sd fixture.

pub mod folder;
pub mod tokenizer;
pub mod vae;

pub use folder::DiffusersFolder;
pub use tokenizer::{ClipTokenizer, MAX_LEN};
pub use vae::{post_process, Vae, VaeConfig};

use candle_core::{Result, Tensor};

/// Classifier-free guidance: `eps_uncond + scale * (eps_cond - eps_uncond)`.
pub fn guide(eps_uncond: &Tensor, eps_cond: &Tensor, scale: f64) -> Result<Tensor> {
    eps_uncond + ((eps_cond - eps_uncond)? * scale)?
}
