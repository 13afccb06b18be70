//! One MMDiT block (diffusers' `JointTransformerBlock`): the image tokens and the text tokens
//! each get their own adaptive-norm modulation and feed-forward, and meet in one joint
//! attention. SD3.5's variants are config switches here: RMSNorm on every head's queries and
//! keys (`qk_norm`), and MMDiT-X's second self-attention over the image tokens (`attn2`, with
//! three more modulation vectors: `SD35AdaLayerNormZeroX`). The last block's text stream ends at
//! the attention (`context_pre_only`): its text output would never be read.
//!
//! Everything goes through differentiable ops: the project's kernels for linear layers, layer
//! norm and softmax (candle-nn's fused ones have no backward), plain tensor ops elsewhere.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::model::layers::{attention, linear, Linear};
use crate::model::lora::{Lora, LoraLinear};

/// diffusers' eps for every norm of the MMDiT.
const EPS: f64 = 1e-6;

/// Layer norm without learned affine parameters (`elementwise_affine=False`), through the
/// differentiable kernel with a constant unit weight and zero bias.
#[derive(Debug, Clone)]
pub struct PlainLayerNorm {
    ones: Tensor,
    zeros: Tensor,
}

impl PlainLayerNorm {
    pub fn new(dim: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Self { ones: Tensor::ones(dim, vb.dtype(), vb.device())?, zeros: Tensor::zeros(dim, vb.dtype(), vb.device())? })
    }
}

impl Module for PlainLayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(x, &self.ones, &self.zeros, EPS)
    }
}

/// RMSNorm over the last dimension with a learned scale (`weight`), from plain tensor ops (so
/// differentiable), in f32 whatever the weights' dtype, as diffusers computes it.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))? })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + EPS)?.sqrt()?;
        x32.broadcast_div(&rms)?.to_dtype(x.dtype())?.broadcast_mul(&self.weight)
    }
}

/// `x * (1 + scale) + shift` with per-sample (N, C) vectors over (N, L, C) tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// A residual branch's output scaled by its per-sample gate (N, C).
fn gated(branch: &Tensor, gate: &Tensor) -> Result<Tensor> {
    branch.broadcast_mul(&gate.unsqueeze(1)?)
}

/// The adaptive norms (`AdaLayerNormZero`: 6 vectors, `SD35AdaLayerNormZeroX`: 9,
/// `AdaLayerNormContinuous`: 2): a non-affine layer norm, and `linear(silu(temb))` cut into
/// `parts` per-sample vectors of the token width, in diffusers' order.
#[derive(Debug, Clone)]
pub struct AdaNorm {
    linear: Linear,
    pub norm: PlainLayerNorm,
    parts: usize,
}

impl AdaNorm {
    pub fn new(dim: usize, parts: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { linear: linear(dim, parts * dim, vb.pp("linear"))?, norm: PlainLayerNorm::new(dim, &vb)?, parts })
    }

    /// The `parts` modulation vectors (N, dim) for conditioning `temb` (N, dim).
    pub fn vectors(&self, temb: &Tensor) -> Result<Vec<Tensor>> {
        self.linear.forward(&temb.silu()?)?.chunk(self.parts, 1)
    }
}

/// Query, key and value projections of one stream, with the optional per-head RMSNorm of the
/// queries and keys.
#[derive(Debug, Clone)]
struct Qkv {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
}

impl Qkv {
    /// Projections named `names` (q, k, v) and norms named `norm_names` under `vb`.
    fn new(shape: AttentionShape, names: [&str; 3], norm_names: [&str; 2], vb: &VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        let AttentionShape { dim, heads, qk_norm } = shape;
        let proj = |name: &str| lora_linear(dim, dim, vb.pp(name), lora);
        let norm = |name: &str| RmsNorm::new(dim / heads, vb.pp(name));
        Ok(Self {
            q: proj(names[0])?,
            k: proj(names[1])?,
            v: proj(names[2])?,
            qk_norm: if qk_norm { Some((norm(norm_names[0])?, norm(norm_names[1])?)) } else { None },
            heads,
        })
    }

    /// The queries of tokens (N, L, C), (N, L, C).
    fn queries(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        match &self.qk_norm {
            Some((norm_q, _)) => self.per_head(norm_q, &q),
            None => Ok(q),
        }
    }

    /// The keys and values of tokens (N, L, C), each (N, L, C).
    fn keys_values(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.k.forward(x)?;
        let k = match &self.qk_norm {
            Some((_, norm_k)) => self.per_head(norm_k, &k)?,
            None => k,
        };
        Ok((k, self.v.forward(x)?))
    }

    /// `norm` applied to each head's slice of (N, L, heads * head_dim).
    fn per_head(&self, norm: &RmsNorm, x: &Tensor) -> Result<Tensor> {
        let (n, l, c) = x.dims3()?;
        norm.forward(&x.reshape((n, l, self.heads, c / self.heads))?)?.reshape((n, l, c))
    }
}

/// A linear layer with bias that may carry a LoRA adapter (the attention projections: Flow-GRPO's
/// LoRA targets).
fn lora_linear(in_dim: usize, out_dim: usize, vb: VarBuilder, lora: Option<&Lora>) -> Result<LoraLinear> {
    LoraLinear::build(linear(in_dim, out_dim, vb.clone())?, in_dim, out_dim, &vb, lora)
}

/// The text stream's part of a joint attention: its projections (`add_q_proj`, `add_k_proj`,
/// `add_v_proj`, norms `norm_added_q` / `norm_added_k`) and, unless the block is the last,
/// its output projection (`to_add_out`).
#[derive(Debug, Clone)]
struct ContextAttention {
    qkv: Qkv,
    to_add_out: Option<LoraLinear>,
}

/// diffusers' `Attention` with `JointAttnProcessor2_0`: self-attention over the image tokens
/// (`attn2`), or, with a [`ContextAttention`], one attention over the image tokens followed by
/// the text tokens (`attn`).
#[derive(Debug, Clone)]
pub struct JointAttention {
    image: Qkv,
    to_out: LoraLinear,
    context: Option<ContextAttention>,
    heads: usize,
}

/// Shape of an attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub dim: usize,
    pub heads: usize,
    pub qk_norm: bool,
}

impl JointAttention {
    /// `joint`: `None` for image self-attention, else whether the text stream ends here
    /// (`context_pre_only`).
    pub fn new(shape: AttentionShape, joint: Option<bool>, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        let image = Qkv::new(shape, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"], &vb, lora)?;
        let context = match joint {
            None => None,
            Some(pre_only) => Some(ContextAttention {
                qkv: Qkv::new(shape, ["add_q_proj", "add_k_proj", "add_v_proj"], ["norm_added_q", "norm_added_k"], &vb, lora)?,
                to_add_out: if pre_only { None } else { Some(lora_linear(shape.dim, shape.dim, vb.pp("to_add_out"), lora)?) },
            }),
        };
        Ok(Self { image, to_out: lora_linear(shape.dim, shape.dim, vb.pp("to_out.0"), lora)?, context, heads: shape.heads })
    }

    /// Image tokens `x` (N, L, C) and, for a joint attention, text tokens `ctx` (N, S, C) ->
    /// the image output and (unless `context_pre_only`) the text output.
    pub fn forward(&self, x: &Tensor, ctx: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let q = self.image.queries(x)?;
        let (k, v) = self.image.keys_values(x)?;
        let (context, ctx) = match (&self.context, ctx) {
            (Some(c), Some(t)) => (c, t),
            (None, None) => return Ok((self.to_out.forward(&attention(&q, &k, &v, self.heads, None)?)?, None)),
            _ => candle_core::bail!("joint attention needs text tokens exactly when it has text projections"),
        };
        let (ck, cv) = context.qkv.keys_values(ctx)?;
        // The text stream's queries matter only where its output is read.
        let q = match &context.to_add_out {
            Some(_) => Tensor::cat(&[&q, &context.qkv.queries(ctx)?], 1)?,
            None => q,
        };
        let (k, v) = (Tensor::cat(&[&k, &ck], 1)?, Tensor::cat(&[&v, &cv], 1)?);
        let out = attention(&q, &k, &v, self.heads, None)?;
        let l = x.dim(1)?;
        let image_out = self.to_out.forward(&out.narrow(1, 0, l)?)?;
        let text_out = match &context.to_add_out {
            Some(proj) => Some(proj.forward(&out.narrow(1, l, ctx.dim(1)?)?)?),
            None => None,
        };
        Ok((image_out, text_out))
    }
}

/// Feed-forward `net.0.proj` (to 4x width), tanh-approximated GELU, `net.2` (diffusers'
/// `FeedForward` with `gelu-approximate`).
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { proj_in: linear(dim, 4 * dim, vb.pp("net.0.proj"))?, proj_out: linear(4 * dim, dim, vb.pp("net.2"))? })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (`gelu_erf` the exact one).
        self.proj_out.forward(&self.proj_in.forward(x)?.gelu()?)
    }
}

/// A stream's feed-forward with its pre-norm: `x + gate * ff(modulate(norm2(x), shift, scale))`.
#[derive(Debug, Clone)]
struct MlpBranch {
    norm: PlainLayerNorm,
    ff: FeedForward,
}

impl MlpBranch {
    fn new(dim: usize, norm_vb: &VarBuilder, ff_vb: VarBuilder) -> Result<Self> {
        Ok(Self { norm: PlainLayerNorm::new(dim, norm_vb)?, ff: FeedForward::new(dim, ff_vb)? })
    }

    /// `m`: the stream's (shift, scale, gate) for its feed-forward.
    fn forward(&self, x: &Tensor, m: [&Tensor; 3]) -> Result<Tensor> {
        let [shift, scale, gate] = m;
        let branch = self.ff.forward(&modulate(&self.norm.forward(x)?, shift, scale)?)?;
        x + gated(&branch, gate)?
    }
}

/// One `JointTransformerBlock`.
#[derive(Debug, Clone)]
pub struct JointBlock {
    norm1: AdaNorm,
    norm1_context: AdaNorm,
    attn: JointAttention,
    attn2: Option<JointAttention>,
    mlp: MlpBranch,
    /// The text stream's feed-forward; `None` in the last block (`context_pre_only`).
    context_mlp: Option<MlpBranch>,
}

impl JointBlock {
    pub fn new(shape: AttentionShape, context_pre_only: bool, dual_attention: bool, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        let dim = shape.dim;
        Ok(Self {
            norm1: AdaNorm::new(dim, if dual_attention { 9 } else { 6 }, vb.pp("norm1"))?,
            // The last block's text norm is an `AdaLayerNormContinuous`: (scale, shift) only.
            norm1_context: AdaNorm::new(dim, if context_pre_only { 2 } else { 6 }, vb.pp("norm1_context"))?,
            attn: JointAttention::new(shape, Some(context_pre_only), vb.pp("attn"), lora)?,
            attn2: if dual_attention { Some(JointAttention::new(shape, None, vb.pp("attn2"), lora)?) } else { None },
            mlp: MlpBranch::new(dim, &vb, vb.pp("ff"))?,
            context_mlp: if context_pre_only { None } else { Some(MlpBranch::new(dim, &vb, vb.pp("ff_context"))?) },
        })
    }

    /// Image tokens `x` (N, L, C), text tokens `ctx` (N, S, C), conditioning `temb` (N, C) ->
    /// the new image tokens and (unless this is the last block) the new text tokens.
    pub fn forward(&self, x: &Tensor, ctx: &Tensor, temb: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let m = self.norm1.vectors(temb)?;
        let normed = self.norm1.norm.forward(x)?;
        let cm = self.norm1_context.vectors(temb)?;
        let ctx_normed = self.norm1_context.norm.forward(ctx)?;
        let ctx_in = match cm.as_slice() {
            [scale, shift] => modulate(&ctx_normed, shift, scale)?,
            _ => modulate(&ctx_normed, &cm[0], &cm[1])?,
        };
        let (attn_out, ctx_attn_out) = self.attn.forward(&modulate(&normed, &m[0], &m[1])?, Some(&ctx_in))?;
        let mut x = (x + gated(&attn_out, &m[2])?)?;
        if let Some(attn2) = &self.attn2 {
            // MMDiT-X: the same normed tokens, modulated by the last three vectors.
            let (out2, _) = attn2.forward(&modulate(&normed, &m[6], &m[7])?, None)?;
            x = (x + gated(&out2, &m[8])?)?;
        }
        let x = self.mlp.forward(&x, [&m[3], &m[4], &m[5]])?;
        let ctx = match (&self.context_mlp, ctx_attn_out) {
            (Some(mlp), Some(out)) => Some(mlp.forward(&(ctx + gated(&out, &cm[2])?)?, [&cm[3], &cm[4], &cm[5]])?),
            _ => None,
        };
        Ok((x, ctx))
    }
}
