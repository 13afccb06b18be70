//! The convolution as one autograd node, with a hand-written backward pass.
//!
//! Stride-1 convolutions go through [`implicit_gemm`] forward, and backward too except 1x1
//! ones (measured no faster there); what follows describes the im2col path that the strided
//! ones take, and the 1x1 ones' backward.
//!
//! Built from [`Im2Col`] and candle matmuls alone, autograd would keep the columns (C*kh*kw
//! times the input's size) alive until backward, accumulate their gradient through a zeroed
//! buffer of the same size, and compute the weight gradient as grad @ cols^T per batch item,
//! which gemm runs markedly slower than the transposed product. [`Conv2dOp`] instead keeps
//! only x and w, recomputes the columns in backward (cheap next to the matmuls) and picks
//! the fastest product layouts:
//! - forward: `cols^T (N, P, K) @ W^T (K, O) = out^T (N, P, O)`, transposed to (N, O, P) in
//!   one pass (gemm is slow when the row count, O, is small),
//!   a cache-sized batch chunk at a time so the columns never reach main memory;
//! - input gradient: `W^T (K, O) @ grad (N, O, P) = dcols (N, K, P)`, then col2im;
//! - weight gradient: `sum_n cols_n (K, P) @ grad_n^T (P, O) = dW^T (K, O)`.
//!
//! Its gradients are computed outside the graph, so second derivatives are not available.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{contiguous_f32, im2col_vec, Col2Im, ConvGeom, Im2Col};
use super::implicit_gemm;
use super::slices::{sum, sum_rows, with_f32};

/// 2-D convolution of a contiguous f32 CPU image (N, C, H, W) with weights (O, C, kh, kw).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dOp {
    pub geom: ConvGeom,
    /// Output channels.
    pub o: usize,
}

impl Conv2dOp {
    /// A 1x1, stride-1, unpadded convolution needs no unfolding: x is its own columns.
    fn pointwise(&self) -> bool {
        let g = &self.geom;
        g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0
    }

    fn weight_shape(&self) -> Shape {
        let g = &self.geom;
        (self.o, g.c, g.kh, g.kw).into()
    }

    fn out_shape(&self) -> Shape {
        let g = &self.geom;
        (g.n, self.o, g.ho, g.wo).into()
    }

    /// The columns (N, K, P) of the image tensor `x`, outside the autograd graph.
    fn columns(&self, x: &Tensor) -> Result<Tensor> {
        let g = &self.geom;
        let x = x.detach().contiguous()?;
        if self.pointwise() {
            x.reshape((g.n, g.k(), g.p()))
        } else {
            x.apply_op1_no_bwd(&Im2Col(*g))
        }
    }

    /// Folds column gradients (N, K, P) back into an image gradient (N, C, H, W).
    fn uncolumns(&self, dcols: &Tensor) -> Result<Tensor> {
        let g = &self.geom;
        if self.pointwise() {
            dcols.reshape((g.n, g.c, g.h, g.w))
        } else {
            dcols.apply_op1_no_bwd(&Col2Im(*g))
        }
    }

    /// The weights as an (N, O, K) stack sharing one (O, K) buffer (batch stride zero).
    fn weight_stack(&self, w: &Tensor) -> Result<Tensor> {
        let (n, k) = (self.geom.n, self.geom.k());
        w.reshape((self.o, k))?
            .unsqueeze(0)?
            .broadcast_as((n, self.o, k))
    }
}

/// Target size of one batch chunk's columns in the forward pass (4 MiB of f32).
const COLS_CHUNK_FLOATS: usize = 1 << 20;

impl Conv2dOp {
    /// Convolves `items` images `x` into `out` (items, O, P), given W^T stacked per item.
    ///
    /// out^T (P, O) = cols^T (P, K) @ W^T (K, O): gemm runs this orientation faster than
    /// W @ cols, whose row count (O) is small; the transpose back is one cheap pass.
    fn forward_items(&self, x: &[f32], w_t: &Tensor, items: usize, out: &mut [f32]) -> Result<()> {
        let g = ConvGeom {
            n: items,
            ..self.geom
        };
        let cols = Tensor::from_vec(im2col_vec(&g, x), g.cols_shape(), &Device::Cpu)?;
        let out_t = cols.t()?.matmul(w_t)?.flatten_all()?.to_vec1::<f32>()?;
        transpose_batched(&out_t, g.p(), self.o, out);
        Ok(())
    }
}

impl Conv2dOp {
    /// The forward pass on contiguous f32 slices: (N, O, Ho*Wo) in row-major order.
    fn forward_vec(&self, x: &[f32], w: &[f32]) -> Result<Vec<f32>> {
        let g = &self.geom;
        if implicit_gemm::supported(g) {
            return Ok(implicit_gemm::forward(g, self.o, x, w));
        }
        let w = Tensor::from_slice(w, self.weight_shape(), &Device::Cpu)?;
        let w = self.weight_stack(&w)?;
        let mut out = vec![0f32; g.n * self.o * g.p()];
        // Batch chunks whose columns fit in cache: unfolding and multiplying them back to back
        // keeps the columns out of main memory, and bounds the forward's extra memory.
        let per_item = g.k() * g.p();
        let chunk = (COLS_CHUNK_FLOATS / per_item).clamp(1, g.n);
        // W^T is materialised once per chunk item, not per batch item (a (N, K, O) copy is
        // tens of MB for the wide layers): with a zero batch stride candle would fold the
        // batch into the rows of one gemm, which is wrong for the column-major cols^T.
        let w_t = w.narrow(0, 0, chunk)?.t()?.contiguous()?;
        let (image, out_item) = (g.c * g.h * g.w, self.o * g.p());
        for (xs, os) in x
            .chunks(chunk * image)
            .zip(out.chunks_mut(chunk * out_item))
        {
            let items = xs.len() / image;
            self.forward_items(xs, &w_t.narrow(0, 0, items)?, items, os)?;
        }
        Ok(out)
    }

    /// Reads the contiguous input and weight slices, checking their shapes.
    fn inputs<'a>(
        &self,
        (xs, xl): (&'a CpuStorage, &Layout),
        (ws, wl): (&'a CpuStorage, &Layout),
    ) -> Result<(&'a [f32], &'a [f32])> {
        let x = contiguous_f32(xs, xl, &self.geom.image_shape(), "conv2d input")?;
        let w = contiguous_f32(ws, wl, &self.weight_shape(), "conv2d weight")?;
        Ok((x, w))
    }

    /// Both gradients (input, weight) given the output gradient.
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let g = &self.geom;
        // 1x1 kernels keep the direct products below: through implicit_gemm their backward
        // measured no faster (their forward is).
        if implicit_gemm::supported(g) && !self.pointwise() {
            return self.backward_implicit(x, w, grad);
        }
        let (n, p) = (g.n, g.p());
        let grad = grad.detach().contiguous()?.reshape((n, self.o, p))?;
        let w = w.detach();

        let dcols = self.weight_stack(&w)?.t()?.matmul(&grad)?;
        let dx = self.uncolumns(&dcols)?;

        // (K, P) @ (P, O) per item: the product gemm runs fastest for this reduction.
        let cols = self.columns(x)?;
        let per_item = cols.matmul(&grad.t()?)?;
        let (k, o) = (g.k(), self.o);
        let dw_t = with_f32(&per_item, "conv2d weight backward", |v| sum_items(v, n, k * o))?;
        let dw = Tensor::from_vec(dw_t, (k, o), &Device::Cpu)?.t()?;
        let dw = dw.contiguous()?.reshape(self.weight_shape())?;
        Ok((dx, dw))
    }
}

impl Conv2dOp {
    /// Both gradients of a stride-1 convolution, through [`implicit_gemm`].
    fn backward_implicit(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let (g, o) = (&self.geom, self.o);
        let (dx, dw) = with_f32(&grad.detach(), "conv2d backward", |gr| -> Result<_> {
            let dx = with_f32(w, "conv2d input backward", |w| implicit_gemm::input_grad(g, o, gr, w))?;
            let dw = with_f32(x, "conv2d weight backward", |x| implicit_gemm::weight_grad(g, o, x, gr))?;
            Ok((dx, dw))
        })??;
        let dx = Tensor::from_vec(dx, g.image_shape(), &Device::Cpu)?;
        Ok((dx, Tensor::from_vec(dw, self.weight_shape(), &Device::Cpu)?))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ddpo-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = self.inputs((xs, xl), (ws, wl))?;
        Ok((CpuStorage::F32(self.forward_vec(x, w)?), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// [`Conv2dOp`] followed by a per-channel bias, as one node.
///
/// A separate broadcast add would cost a graph node (candle accumulates every node's input
/// gradient into a freshly zeroed buffer) and its bias gradient a slow strided reduction over
/// (0, 2, 3); here the bias is added to each output plane and its gradient is a contiguous
/// sum per plane. The bias is (O,), or (N, O) for a per-sample bias (the resnet blocks fold
/// their timestep embedding into it).
#[derive(Debug, Clone, Copy)]
pub struct Conv2dBiasOp {
    pub conv: Conv2dOp,
    /// Whether the bias is (N, O) rather than (O,).
    pub per_sample: bool,
}

impl Conv2dBiasOp {
    fn bias_shape(&self) -> Shape {
        if self.per_sample {
            (self.conv.geom.n, self.conv.o).into()
        } else {
            self.conv.o.into()
        }
    }
}

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "ddpo-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let conv = &self.conv;
        let (x, w) = conv.inputs((xs, xl), (ws, wl))?;
        let b = contiguous_f32(bs, bl, &self.bias_shape(), "conv2d bias")?;
        let mut out = conv.forward_vec(x, w)?;
        add_plane_bias(&mut out, b, conv.o, conv.geom.p());
        Ok((CpuStorage::F32(out), conv.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.conv.backward(x, w, grad)?;
        let db = bias_grad(grad, self.conv.o, self.per_sample)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Transposes each row-major (rows, cols) matrix in `src` into (cols, rows) in `dst`.
fn transpose_batched(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    if rows * cols == 0 {
        return;
    }
    dst.par_chunks_mut(rows * cols)
        .zip(src.par_chunks(rows * cols))
        .for_each(|(d, s)| {
            // Blocks of 16 source rows keep the strided writes within a few cache lines.
            for r0 in (0..rows).step_by(16) {
                let r1 = (r0 + 16).min(rows);
                for c in 0..cols {
                    let out = &mut d[c * rows + r0..c * rows + r1];
                    for (o, r) in out.iter_mut().zip(r0..r1) {
                        *o = s[r * cols + c];
                    }
                }
            }
        });
}

/// Sums `items` consecutive row-major blocks of `len` floats: candle's `sum(0)` walks the
/// batch with a strided loop, several times slower than adding whole contiguous rows.
fn sum_items(v: &[f32], items: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    if len == 0 {
        return out;
    }
    // Column blocks small enough to stay in L1 while every item is added in.
    out.par_chunks_mut(2048).enumerate().for_each(|(bi, acc)| {
        let start = bi * 2048;
        for item in v.chunks_exact(len).take(items) {
            let row = &item[start..start + acc.len()];
            acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
        }
    });
    out
}

/// Adds bias entry `i % b.len()` to each plane `i` of `out`, planes `p` long: a (O,) bias
/// repeats for every sample, an (N, O) bias has one entry per plane.
fn add_plane_bias(out: &mut [f32], b: &[f32], o: usize, p: usize) {
    if p == 0 || o == 0 {
        return;
    }
    out.par_chunks_mut(p).enumerate().for_each(|(i, plane)| {
        let v = b[i % b.len()];
        plane.iter_mut().for_each(|y| *y += v);
    });
}

/// The bias gradient: each output plane's gradient summed, then over samples for (O,) biases.
fn bias_grad(grad: &Tensor, o: usize, per_sample: bool) -> Result<Tensor> {
    let n = grad.dim(0)?;
    let p = grad.elem_count() / (n * o).max(1);
    let sums: Vec<f32> = with_f32(grad, "conv2d bias backward", |g| {
        if p == 0 {
            vec![0f32; n * o]
        } else {
            g.par_chunks(p).map(sum).collect()
        }
    })?;
    if per_sample {
        Tensor::from_vec(sums, (n, o), &Device::Cpu)
    } else {
        Tensor::from_vec(sum_rows(&sums, o), o, &Device::Cpu)
    }
}
