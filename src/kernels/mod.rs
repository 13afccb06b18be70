//! Project-owned compute kernels for the CPU, where candle's own are slow.
//!
//! The model calls [`conv2d`] for every convolution. candle's CPU conv2d is several times
//! slower than PyTorch's, and its input gradient (conv_transpose2d) is a naive loop that
//! dominates the backward pass. On the CPU with f32 we therefore run an im2col + matmul
//! convolution instead: [`im2col::Im2Col`] unfolds the image into columns (its backward is the
//! scatter-add [`im2col::Col2Im`]), and candle's gemm-backed matmul, which does have a fast
//! backward, does the arithmetic. Both gradients (input and weight) then fall out of candle's
//! autograd. On other devices or dtypes we defer to candle's own conv2d.
//!
//! The first CPU call also switches glibc malloc to recycling freed memory ([`alloc`]): page
//! faults on freshly mapped tensors otherwise cost more than the convolution's copying.

pub mod alloc;
pub mod im2col;

use candle_core::{bail, DType, Device, Result, Tensor};
use im2col::{ConvGeom, Im2Col};

/// 2-D convolution of `x` (N, C, H, W) with `w` (O, C, kh, kw), square stride and padding.
///
/// Differentiable with respect to both `x` and `w`. Returns (N, O, Ho, Wo); the caller adds
/// any bias.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (geom, o) = geometry(x, w, stride, padding)?;
    let fast = matches!(x.device(), Device::Cpu)
        && matches!(w.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32;
    if !fast {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    alloc::reuse_freed_memory();
    if geom.kh == 1 && geom.kw == 1 && stride == 1 && padding == 0 {
        return conv1x1(x, w, &geom, o);
    }
    conv_im2col(x, w, &geom, o)
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

/// The weight as a (N, O, K) matrix stack that shares one (O, K) buffer across the batch.
///
/// The zero batch stride lets candle's gemm read the same weights for every batch item
/// without copying them; autograd sums the per-item weight gradients back over the batch.
fn weight_matrix(w: &Tensor, n: usize, o: usize, k: usize) -> Result<Tensor> {
    w.reshape((o, k))?.unsqueeze(0)?.broadcast_as((n, o, k))
}

/// A 1x1, stride-1, unpadded convolution is already a matmul over channels: no unfolding.
fn conv1x1(x: &Tensor, w: &Tensor, g: &ConvGeom, o: usize) -> Result<Tensor> {
    let x = x.contiguous()?.reshape((g.n, g.c, g.h * g.w))?;
    weight_matrix(w, g.n, o, g.c)?
        .matmul(&x)?
        .reshape((g.n, o, g.h, g.w))
}

/// General convolution: unfold to columns (N, K, P), multiply by the (O, K) weights.
fn conv_im2col(x: &Tensor, w: &Tensor, g: &ConvGeom, o: usize) -> Result<Tensor> {
    let cols = x.contiguous()?.apply_op1(Im2Col(*g))?;
    weight_matrix(w, g.n, o, g.k())?
        .matmul(&cols)?
        .reshape((g.n, o, g.ho, g.wo))
}
