//! The convolution as one autograd node, with a hand-written backward pass.
//!
//! Built from [`Im2Col`] and candle matmuls alone, autograd would keep the columns (C*kh*kw
//! times the input's size) alive until backward, accumulate their gradient through a zeroed
//! buffer of the same size, and compute the weight gradient as grad @ cols^T per batch item,
//! which gemm runs markedly slower than the transposed product. [`Conv2dOp`] instead keeps
//! only x and w, recomputes the columns in backward (cheap next to the matmuls) and picks
//! the fastest product layouts:
//! - forward: `cols^T (N, P, K) @ W^T (K, O) = out^T (N, P, O)`, transposed to (N, O, P) in
//!   one pass (gemm is slow when the row count, O, is small; 1x1 convs use `W @ x` directly);
//! - input gradient: `W^T (K, O) @ grad (N, O, P) = dcols (N, K, P)`, then col2im;
//! - weight gradient: `sum_n cols_n (K, P) @ grad_n^T (P, O) = dW^T (K, O)`.
//!
//! Its gradients are computed outside the graph, so second derivatives are not available.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::{contiguous_f32, im2col_vec, Col2Im, ConvGeom, Im2Col};

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
        let g = &self.geom;
        let x = contiguous_f32(xs, xl, &g.image_shape(), "conv2d input")?;
        let w = contiguous_f32(ws, wl, &self.weight_shape(), "conv2d weight")?;
        let cols = if self.pointwise() {
            Tensor::from_slice(x, (g.n, g.k(), g.p()), &Device::Cpu)?
        } else {
            Tensor::from_vec(im2col_vec(g, x), g.cols_shape(), &Device::Cpu)?
        };
        let w = Tensor::from_slice(w, self.weight_shape(), &Device::Cpu)?;
        let w = self.weight_stack(&w)?;
        if self.pointwise() {
            // Few rows (K = C) and pixels: the plain orientation is as fast and needs no
            // transpose.
            let out = w.matmul(&cols)?.flatten_all()?.to_vec1()?;
            return Ok((CpuStorage::F32(out), self.out_shape()));
        }
        // out^T (N, P, O) = cols^T (N, P, K) @ W^T (K, O): gemm runs this orientation faster
        // than W @ cols, whose row count (O) is small; the transpose back is one cheap pass.
        // W^T is materialised per item (it is small): with a zero batch stride candle would fold
        // the batch into the rows of one gemm, which is wrong for the column-major cols^T.
        let w_t = w.t()?.contiguous()?;
        let out_t = cols.t()?.matmul(&w_t)?;
        let out_t = out_t.flatten_all()?.to_vec1::<f32>()?;
        let out = transpose_batched(&out_t, g.n, g.p(), self.o);
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = &self.geom;
        let (n, p) = (g.n, g.p());
        let grad = grad.detach().contiguous()?.reshape((n, self.o, p))?;
        let w = w.detach();

        let dcols = self.weight_stack(&w)?.t()?.matmul(&grad)?;
        let dx = self.uncolumns(&dcols)?;

        // (K, P) @ (P, O) per item: the product gemm runs fastest for this reduction.
        let cols = self.columns(x)?;
        let dw = cols.matmul(&grad.t()?)?.sum(0)?.t()?;
        let dw = dw.contiguous()?.reshape(self.weight_shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Transposes each of the `n` row-major (rows, cols) matrices in `src` to (cols, rows).
fn transpose_batched(src: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    let len = n * rows * cols;
    let mut dst = vec![0f32; len];
    if len == 0 {
        return dst;
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
    dst
}
