//! Small building blocks shared by the UNet and the text encoder: convolution, GroupNorm and
//! layer norm (through the project's fast kernels, all differentiable), linear layers, attention.
//!
//! candle-nn's own `LayerNorm` takes a fused path without a backward pass when its input is
//! contiguous, which silently stops gradients; everything here is differentiable.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// 2-D convolution with bias, weights named `weight` / `bias` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = (in_c * kernel * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vb.get_with_hints(
            (out_c, in_c, kernel, kernel),
            "weight",
            Init::Uniform { lo: -bound, up: bound },
        )?;
        let bias = vb.get_with_hints(out_c, "bias", Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight, bias, stride, padding })
    }
}

impl Conv2d {
    /// The convolution plus a per-sample offset `extra` (N, out_c) on each output channel,
    /// added in the same node as the bias (the resnet blocks' timestep embedding).
    pub fn forward_plus(&self, x: &Tensor, extra: &Tensor) -> Result<Tensor> {
        let bias = extra.broadcast_add(&self.bias.unsqueeze(0)?)?;
        crate::kernels::conv2d(x, &self.weight, Some(&bias), self.stride, self.padding)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::conv2d(x, &self.weight, Some(&self.bias), self.stride, self.padding)
    }
}

/// Layer norm over the last dimension, `weight` / `bias` named as in PyTorch.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// GroupNorm as in PyTorch, `weight` / `bias` named as there, through the fused kernel.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads (or initialises to the identity) a GroupNorm over `channels` in `groups` groups.
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
        }
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, groups, eps })
    }

    /// GroupNorm followed by SiLU, fused into one node.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
    }
}

/// Linear layer `y = x W^T + b` on the last dimension of any (.., in) input, `weight` (out, in)
/// and `bias` (out,) named as in PyTorch; the rows go through [`crate::kernels::linear`].
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = x.flatten_to(dims.len().saturating_sub(2))?;
        let y = crate::kernels::linear(&rows, &self.weight, self.bias.as_ref())?;
        let mut out_dims = dims;
        match out_dims.last_mut() {
            Some(last) => *last = self.weight.dim(0)?,
            None => candle_core::bail!("linear: input must have at least one dimension"),
        }
        y.reshape(out_dims)
    }
}

/// Linear layer with bias (PyTorch default init).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// Linear layer without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let l = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), None))
}

/// Multi-head scaled dot-product attention on (B, L, H*D) projections; `mask` (Lq, Lk) is added
/// to the scores (e.g. a causal mask). The scale, mask and softmax are one differentiable node
/// ([`crate::kernels::softmax_last_dim`]).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, l: usize| t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q, lq)?, split(k, lk)?, split(v, lk)?);
    // Half-precision weights (GPU): scores and softmax in f32, as diffusers' `upcast_attention`
    // does for SD 2.x, since f16 q.k overflows there. All of this is a no-op in f32.
    let scores = if q.dtype() == DType::F16 {
        q.to_dtype(DType::F32)?.matmul(&k.to_dtype(DType::F32)?.t()?)?
    } else {
        crate::kernels::bmm(&q, false, &k, true)?.to_dtype(DType::F32)?
    };
    let probs = crate::kernels::softmax_last_dim(&scores, 1.0 / (d as f64).sqrt(), mask)?;
    crate::kernels::bmm(&probs.to_dtype(v.dtype())?, false, &v, false)?
        .transpose(1, 2)?
        .reshape((b, lq, inner))
}
