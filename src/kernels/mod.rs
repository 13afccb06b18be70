//! Project-owned compute kernels for the CPU, where candle's own are slow.
//!
//! The model calls [`conv2d`] for every convolution. candle's CPU conv2d is several times
//! slower than PyTorch's, and its input gradient (conv_transpose2d) is a naive loop that
//! dominates the backward pass. On the CPU with f32 we therefore run an im2col + matmul
//! convolution instead, as one autograd node ([`conv_op::Conv2dOp`]): [`im2col`] unfolds the
//! image into columns (and folds column gradients back), candle's gemm-backed matmul does the
//! arithmetic, and the backward pass computes both gradients with hand-picked matmul layouts.
//! On other devices or dtypes we defer to candle's own conv2d.
//!
//! The first CPU call also switches glibc malloc to recycling freed memory ([`alloc`]): page
//! faults on freshly mapped tensors otherwise cost more than the convolution's copying.

pub mod alloc;
pub mod conv_op;
pub mod im2col;

use candle_core::{bail, DType, Device, Result, Tensor};
use conv_op::Conv2dOp;
use im2col::ConvGeom;

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
    // Contiguous copies keep autograd intact and let the op read plain row-major slices.
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dOp { geom, o })
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
