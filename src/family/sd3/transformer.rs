//! `SD3Transformer2DModel`: patchify with position embedding, conditioning from the timestep and
//! the pooled text, the text sequence projected to the token width (`context_embedder`), the
//! joint blocks, a final adaptive norm (`norm_out`) and the projection back to patches
//! (`proj_out`), unpatchified to the latent's shape. The output is the flow's velocity.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::block::{modulate, AdaNorm, AttentionShape, JointBlock};
use super::embed::{PatchEmbed, TimeTextEmbed};
use super::Sd3Config;
use crate::model::layers::{linear, Linear};
use crate::model::lora::Lora;

/// The MMDiT of Stable Diffusion 3 / 3.5, weights named as in diffusers.
#[derive(Debug, Clone)]
pub struct Sd3Transformer {
    pub config: Sd3Config,
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: AdaNorm,
    proj_out: Linear,
}

impl Sd3Transformer {
    /// Builds the model from `vb` (loaded or initialised weights); `lora` adds adapters on every
    /// attention projection.
    pub fn new(cfg: &Sd3Config, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        cfg.validate().map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let dim = cfg.inner_dim();
        let shape = AttentionShape { dim, heads: cfg.num_attention_heads, qk_norm: cfg.qk_rms_norm() };
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let last = i + 1 == cfg.num_layers;
                let dual = cfg.dual_attention_layers.contains(&i);
                JointBlock::new(shape, last, dual, vb.pp(format!("transformer_blocks.{i}")), lora)
            })
            .collect::<Result<Vec<_>>>()?;
        let patch_out = cfg.patch_size * cfg.patch_size * cfg.out_channels();
        Ok(Self {
            config: cfg.clone(),
            pos_embed: PatchEmbed::new(cfg, vb.pp("pos_embed"))?,
            time_text_embed: TimeTextEmbed::new(cfg, vb.pp("time_text_embed"))?,
            context_embedder: linear(cfg.joint_attention_dim, cfg.caption_projection_dim, vb.pp("context_embedder"))?,
            blocks,
            // `AdaLayerNormContinuous`: (scale, shift).
            norm_out: AdaNorm::new(dim, 2, vb.pp("norm_out"))?,
            proj_out: linear(dim, patch_out, vb.pp("proj_out"))?,
        })
    }

    /// The velocity for latents `latent` (N, C, H, W) at `timestep` (N,) (sigma x 1000), text
    /// states `context` (N, S, joint_attention_dim) and pooled text `pooled` (N,
    /// pooled_projection_dim). Returns (N, out_channels, H, W).
    pub fn forward(&self, latent: &Tensor, timestep: &Tensor, context: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = latent.dims4()?;
        let mut x = self.pos_embed.forward(latent)?;
        let temb = self.time_text_embed.forward(timestep, pooled)?;
        let mut ctx = self.context_embedder.forward(context)?;
        for block in &self.blocks {
            let (new_x, new_ctx) = block.forward(&x, &ctx, &temb)?;
            x = new_x;
            // Only the last block returns no text tokens, and nothing reads them after it.
            if let Some(c) = new_ctx {
                ctx = c;
            }
        }
        let v = self.norm_out.vectors(&temb)?;
        let normed = self.norm_out.norm.forward(&x)?;
        let x = modulate(&normed, &v[1], &v[0])?;
        self.unpatchify(&self.proj_out.forward(&x)?, n, h, w)
    }

    /// Tokens (N, gh * gw, p * p * C) back to (N, C, gh * p, gw * p).
    fn unpatchify(&self, tokens: &Tensor, n: usize, h: usize, w: usize) -> Result<Tensor> {
        let (p, c) = (self.config.patch_size, self.config.out_channels());
        let (gh, gw) = (h / p, w / p);
        tokens.reshape((n, gh, gw, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((n, c, h, w))
    }
}
