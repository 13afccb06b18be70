//! Project-owned compute kernels for the CPU, where candle's own are slow.
//!
//! The model calls [`conv2d`] for every convolution. candle's CPU conv2d is several times
//! slower than PyTorch's, and its input gradient (conv_transpose2d) is a naive loop that
//! dominates the backward pass. On the CPU with f32 we therefore run our own convolution, as
//! one autograd node with a hand-written backward ([`conv_op::Conv2dOp`]). Stride-1 kernels
//! (all but the downsamplers) are a few shifted gemm calls over a padded channels-last copy of
//! the image ([`implicit_gemm`]), forward and backward; the rest unfold the image into
//! columns ([`im2col`]) for candle's gemm-backed matmul. gemm is built with its AVX-512
//! kernels (picked at run time where the CPU has them). On other devices or dtypes we defer
//! to candle's own conv2d. The conv's bias is added in the
//! same node ([`conv_op::Conv2dBiasOp`]), per channel or per (sample, channel).
//!
//! [`group_norm`] replaces candle-nn's composed GroupNorm (and the SiLU after it) with one node
//! whose backward is hand-written ([`norm_op`]): candle's version spends ~20x its forward in
//! backward, mostly in strided reductions. [`layer_norm`] does the same for the transformers'
//! layer norms ([`layer_norm_op`]).
//!
//! [`linear`] is the linear layer as one node ([`linear_op`]): candle-nn's is four, whose
//! backward zeroes and adds the output gradient twice and sums the bias gradient with a
//! strided reduction.
//!
//! [`bmm`] runs the attention's many small per-head products whole on each thread
//! ([`bmm_op`]): candle spreads each of them over the threads, at more cost than arithmetic.
//!
//! The attention's [`softmax_last_dim`] (scale, mask and softmax, [`softmax_op`]) and the
//! feed-forward's [`geglu`] gate ([`geglu_op`]) are single nodes for the same reason: composed,
//! they are five to seven small candle ops, each an allocation forward and a zeroed gradient
//! buffer plus an accumulation backward.
//!
//! The first CPU call also switches glibc malloc to recycling freed memory ([`alloc`]): page
//! faults on freshly mapped tensors otherwise cost more than the convolution's copying.

pub mod alloc;
pub mod bmm_op;
pub mod conv_op;
pub mod geglu_op;
pub mod im2col;
pub mod implicit_gemm;
pub mod layer_norm_op;
pub mod linear_op;
pub mod norm_op;
mod product;
pub mod no_grad;
pub mod shards;
mod simd;
mod slices;
pub mod softmax_op;

use candle_core::{bail, DType, Device, Result, Tensor};
use bmm_op::BmmOp;
use conv_op::{Conv2dBiasOp, Conv2dOp};
pub use geglu_op::geglu;
pub use softmax_op::softmax_last_dim;
use layer_norm_op::LayerNormOp;
use linear_op::{LinearBiasOp, LinearOp};
use norm_op::GroupNormOp;
use im2col::ConvGeom;

/// 2-D convolution of `x` (N, C, H, W) with `w` (O, C, kh, kw), square stride and padding,
/// plus an optional bias: (O,) per channel, or (N, O) per sample and channel.
///
/// Differentiable with respect to `x`, `w` and the bias. Returns (N, O, Ho, Wo).
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (geom, o) = geometry(x, w, stride, padding)?;
    let per_sample = match bias.map(|b| b.dims()) {
        None => false,
        Some(&[bo]) if bo == o => false,
        Some(&[bn, bo]) if bn == geom.n && bo == o => true,
        Some(d) => bail!(
            "conv2d: bias must be ({o},) or ({}, {o}) for input {:?} and weight {:?}, got {d:?}",
            geom.n,
            x.dims(),
            w.dims()
        ),
    };
    if !all_cpu_f32(&[Some(x), Some(w), bias]) {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((if per_sample { geom.n } else { 1 }, o, 1, 1))?),
            None => Ok(y),
        };
    }
    alloc::reuse_freed_memory();
    // Contiguous copies keep autograd intact and let the op read plain row-major slices.
    let conv = Conv2dOp { geom, o };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        None => x.apply_op2(&w, conv),
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Conv2dBiasOp { conv, per_sample }),
    }
}

/// `x W^T + b` on rows: `x` (M, K), `w` (O, K), an optional bias (O,). Returns (M, O).
///
/// Differentiable with respect to all three. CPU f32 runs one fused node ([`linear_op`]);
/// other devices and dtypes run candle's matmul and broadcast add.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let ((m, k), (o, wk)) = (x.dims2()?, w.dims2()?);
    if k != wk {
        bail!("linear: input {:?} has {k} features, weight {:?} expects {wk}", x.dims(), w.dims());
    }
    if let Some(b) = bias {
        if b.dims() != [o] {
            bail!("linear: bias must be ({o},) for weight {:?}, got {:?}", w.dims(), b.dims());
        }
    }
    if !all_cpu_f32(&[Some(x), Some(w), bias]) {
        let y = x.matmul(&w.t()?)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    alloc::reuse_freed_memory();
    let op = LinearOp { m, k, o };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        None => x.apply_op2(&w, op),
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBiasOp(op)),
    }
}

/// Batched `op(x) @ op(y)` over all leading dimensions, `op` transposing the last two
/// dimensions when its flag is set: (B, H, L, D) queries and keys give (B, H, L, L) scores
/// with `ty`. Differentiable in both; CPU f32 runs one node ([`bmm_op`]), other devices and
/// dtypes candle's matmul.
pub fn bmm(x: &Tensor, tx: bool, y: &Tensor, ty: bool) -> Result<Tensor> {
    let rank = x.rank();
    if rank < 2 || y.rank() != rank || x.dims()[..rank - 2] != y.dims()[..rank - 2] {
        bail!("bmm: operands must share their leading dimensions, got {:?} and {:?}", x.dims(), y.dims());
    }
    let (xr, xc) = (x.dims()[rank - 2], x.dims()[rank - 1]);
    let (yr, yc) = (y.dims()[rank - 2], y.dims()[rank - 1]);
    let ((m, k), (ky, n)) = (if tx { (xc, xr) } else { (xr, xc) }, if ty { (yc, yr) } else { (yr, yc) });
    if k != ky {
        bail!("bmm: inner dimensions differ: {:?}{} times {:?}{}", x.dims(), if tx { "ᵀ" } else { "" }, y.dims(), if ty { "ᵀ" } else { "" });
    }
    if !all_cpu_f32(&[Some(x), Some(y)]) {
        let op = |t: &Tensor, flip: bool| if flip { t.transpose(rank - 2, rank - 1) } else { Ok(t.clone()) };
        return op(x, tx)?.matmul(&op(y, ty)?);
    }
    alloc::reuse_freed_memory();
    let lead = &x.dims()[..rank - 2];
    let batch = lead.iter().product();
    let op = BmmOp { batch, m, k, n, tx, ty };
    let x = x.contiguous()?.reshape((batch, xr, xc))?;
    let y = y.contiguous()?.reshape((batch, yr, yc))?;
    let mut dims = lead.to_vec();
    dims.extend([m, n]);
    x.apply_op2(&y, op)?.reshape(dims)
}

/// GroupNorm of `x` (N, C, *spatial) as PyTorch's: `groups` groups of channels normalised
/// with their biased variance, `eps` inside the square root, then the per-channel affine
/// `weight`, `bias` (C,); followed by SiLU when `silu` is set.
///
/// Differentiable with respect to all three inputs. CPU f32 runs one fused node; other
/// devices and dtypes run candle-nn's composed GroupNorm (and `silu`).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (n, c) = match x.dims() {
        &[n, c, _, ..] => (n, c),
        d => bail!("group_norm: input must be (N, C, *spatial) with a spatial dim, got {d:?}"),
    };
    if groups == 0 || c % groups != 0 {
        bail!("group_norm: {groups} groups do not divide the {c} channels of input {:?}", x.dims());
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [c] {
            bail!("group_norm: {name} must be ({c},) for input {:?}, got {:?}", x.dims(), t.dims());
        }
    }
    if !all_cpu_f32(&[Some(x), Some(weight), Some(bias)]) {
        use candle_core::Module;
        let gn = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, eps)?;
        let y = gn.forward(x)?;
        return if silu { y.silu() } else { Ok(y) };
    }
    alloc::reuse_freed_memory();
    let s = x.elem_count() / (n * c).max(1);
    let op = GroupNormOp { n, c, s, groups, eps: eps as f32, silu };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Layer norm of `x` over its last dimension (biased variance, `eps` inside the square
/// root), then the elementwise affine `weight`, `bias` of that dimension's length.
///
/// Differentiable with respect to all three inputs. CPU f32 runs one fused node; other
/// devices and dtypes run candle-nn's differentiable `layer_norm_slow`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = match x.dims().last() {
        Some(&d) => d,
        None => bail!("layer_norm: input must have at least one dimension, got a scalar"),
    };
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if t.dims() != [d] {
            bail!("layer_norm: {name} must be ({d},) for input {:?}, got {:?}", x.dims(), t.dims());
        }
    }
    if !all_cpu_f32(&[Some(x), Some(weight), Some(bias)]) {
        return candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32);
    }
    alloc::reuse_freed_memory();
    let op = LayerNormOp { d, eps: eps as f32 };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// Whether every given tensor is an f32 tensor on the CPU (the custom ops' only case).
fn all_cpu_f32(ts: &[Option<&Tensor>]) -> bool {
    ts.iter()
        .flatten()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// Checks the ranks and channel counts and returns the geometry and output channel count.
fn geometry(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<(ConvGeom, usize)> {
    let (n, c, h, wd) = match x.dims() {
        &[n, c, h, wd] => (n, c, h, wd),
        d => bail!("conv2d: input must be (N, C, H, W), got shape {d:?}"),
    };
    let (o, cw, kh, kw) = match w.dims() {
        &[o, cw, kh, kw] => (o, cw, kh, kw),
        d => bail!("conv2d: weight must be (O, C, kh, kw), got shape {d:?}"),
    };
    if cw != c {
        bail!(
            "conv2d: input {:?} has {c} channels but weight {:?} expects {cw}",
            x.dims(),
            w.dims()
        );
    }
    Ok((ConvGeom::new((n, c, h, wd), (kh, kw), stride, padding)?, o))
}
