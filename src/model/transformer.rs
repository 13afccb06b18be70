//! The UNet's spatial transformer (diffusers' `Transformer2DModel` with `BasicTransformerBlock`s):
//! self-attention over pixels, cross-attention to the text, and a GEGLU feed-forward.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{attention, linear, linear_no_bias, Conv2d, GroupNorm, LayerNorm, Linear};
use super::lora::{Lora, LoraLinear};

/// Multi-head attention with `to_q`, `to_k`, `to_v` (no bias) and `to_out.0` (with bias), each
/// optionally carrying a LoRA adapter (the reference's LoRA targets).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
}

impl Attention {
    pub fn new(query_dim: usize, context_dim: usize, heads: usize, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        let proj = |name: &str, in_dim: usize, bias: bool| -> Result<LoraLinear> {
            let vb = vb.pp(name);
            let base = if bias { linear(in_dim, query_dim, vb.clone())? } else { linear_no_bias(in_dim, query_dim, vb.clone())? };
            LoraLinear::build(base, in_dim, query_dim, &vb, lora)
        };
        Ok(Self {
            to_q: proj("to_q", query_dim, false)?,
            to_k: proj("to_k", context_dim, false)?,
            to_v: proj("to_v", context_dim, false)?,
            to_out: proj("to_out.0", query_dim, true)?,
            heads,
        })
    }

    /// `x`: (B, L, C); `context`: (B, S, D), or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out.forward(&attention(&q, &k, &v, self.heads, None)?)
    }
}

/// GEGLU feed-forward: `net.0.proj` to twice the inner width, gate with GELU, `net.2` back.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    /// `x`: (.., C). Runs on (rows, C): candle-nn's `Linear` multiplies a 3-D input by its
    /// weight broadcast to one copy per sample, whose backward then builds a weight gradient
    /// per sample and sums them with a slow strided reduction; 2-D it is one matmul each way.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let c = match dims.last() {
            Some(&c) if c > 0 => c,
            _ => candle_core::bail!("FeedForward: input must be (.., C) with C > 0, got {dims:?}"),
        };
        let rows = x.reshape((x.elem_count() / c, c))?;
        let h = self.proj_in.forward(&rows)?;
        let y = self.proj_out.forward(&crate::kernels::geglu(&h)?)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(out_dims)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, vb.pp("attn1"), lora)?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(dim, context_dim, heads, vb.pp("attn2"), lora)?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// Input/output projection of the spatial transformer: 1x1 conv or linear (SD 2.x).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel`: GroupNorm, `proj_in`, transformer blocks over H*W tokens, `proj_out`,
/// plus the residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape parameters of a spatial transformer.
#[derive(Debug, Clone, Copy)]
pub struct SpatialTransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl SpatialTransformer {
    pub fn new(cfg: SpatialTransformerConfig, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        let c = cfg.channels;
        let projection = |name: &str| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(Conv2d::new(c, c, 1, 1, 0, vb.pp(name))?)
            })
        };
        Ok(Self {
            // diffusers fixes this norm's eps at 1e-6, unlike the resnets' norm_eps.
            norm: GroupNorm::new(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks: vec![BasicTransformerBlock::new(
                c,
                cfg.context_dim,
                cfg.heads,
                vb.pp("transformer_blocks.0"),
                lora,
            )?],
            proj_out: projection("proj_out")?,
        })
    }

    /// `x`: (N, C, H, W), `context`: (N, S, D).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let to_tokens = |t: Tensor| t.flatten_from(2)?.transpose(1, 2)?.contiguous();
        let to_image = |t: Tensor| t.transpose(1, 2)?.reshape((n, c, h, w));
        let normed = self.norm.forward(x)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(tokens)?.contiguous()?)?,
            Projection::Linear(lin) => to_image(lin.forward(&tokens)?)?,
        };
        out + x
    }
}
