//! GroupNorm, optionally fused with the SiLU that follows it, as one autograd node.
//!
//! candle-nn's `GroupNorm` is composed of reshapes, reductions and broadcasts; its backward
//! runs a dozen graph nodes, several of them candle's slow strided reductions over (0, 2, 3),
//! and costs ~20x its forward. [`GroupNormOp`] computes the forward in one pass per
//! (sample, group) block and a hand-written backward that recomputes the block's statistics
//! (and, when fused, the pre-activation) from the saved input instead of storing anything:
//! each block is small enough to stay in cache across its two or three passes.
//!
//! With `x̂ = (x - μ) · r` (r = 1/√(σ² + ε), per (n, g)), `y = w_c x̂ + b_c` and `out = y` or
//! `silu(y)`, the gradients given `dy` (the upstream gradient, times silu'(y) when fused) are
//! - `db_c = Σ dy`, `dw_c = Σ dy · x̂` (over samples and pixels of channel c);
//! - `dx = r · (w_c dy - mean(w dy) - x̂ · mean(w dy · x̂))`, means over the (n, g) block.
//!
//! Gradients are computed outside the graph, so second derivatives are not available.

use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::im2col::contiguous_f32;
use super::simd::dispatch_avx2;
use super::slices::{dot, exp, sum, sum_rows, sum_sq_dev, with_f32};

/// GroupNorm of a contiguous f32 CPU tensor (N, C, *spatial), per-channel affine, optional SiLU.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormOp {
    pub n: usize,
    pub c: usize,
    /// Spatial size: the product of the dimensions after the channel.
    pub s: usize,
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

impl GroupNormOp {
    /// Channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Elements per (sample, group) block: channels per group times spatial size.
    fn block(&self) -> usize {
        self.cg() * self.s
    }

    /// Mean and 1/sqrt(var + eps) of one block, two-pass (the block is in cache) for accuracy.
    fn stats(&self, xb: &[f32]) -> (f32, f32) {
        let len = xb.len().max(1) as f32;
        let mean = sum(xb) / len;
        let var = sum_sq_dev(xb, mean) / len;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    /// Normalises, scales and shifts (and optionally SiLUs) one (sample, group) block.
    fn forward_block(&self, g: usize, xb: &[f32], w: &[f32], b: &[f32], ob: &mut [MaybeUninit<f32>]) {
        let (mean, rstd) = self.stats(xb);
        let c0 = g * self.cg();
        let chans = xb.chunks_exact(self.s).zip(ob.chunks_exact_mut(self.s));
        for (ci, (xc, oc)) in chans.enumerate() {
            // y = x * a + shift folds normalisation and affine into one multiply-add.
            let a = rstd * w[c0 + ci];
            let shift = b[c0 + ci] - mean * a;
            affine_row(a, shift, self.silu, xc, oc);
        }
    }

    /// Backward for one (sample, group) block.
    ///
    /// Writes dx into `dxb` and the block's per-channel Σdy and Σdy·x̂ into `dsum`, `dsum_xhat`.
    /// Pass 1 stores dy (the gradient with respect to the affine output) in `dxb` and
    /// accumulates the sums; pass 2 turns it into dx in place.
    fn backward_block(&self, g: usize, blk: BlockGrad<'_>) {
        let BlockGrad { x: xb, grad: gb, w, b, dx: dxb, dsum, dsum_xhat } = blk;
        let (mean, rstd) = self.stats(xb);
        let (s, c0) = (self.s, g * self.cg());
        let (mut sum_wdy, mut sum_wdy_xhat) = (0f32, 0f32);
        for ci in 0..self.cg() {
            let range = ci * s..(ci + 1) * s;
            let (xc, gc, dc) = (&xb[range.clone()], &gb[range.clone()], &mut dxb[range]);
            let wc = w[c0 + ci];
            if self.silu {
                let a = rstd * wc;
                let shift = b[c0 + ci] - mean * a;
                for ((d, &x), &go) in dc.iter_mut().zip(xc).zip(gc) {
                    *d = go * silu_grad(x * a + shift);
                }
            } else {
                dc.copy_from_slice(gc);
            }
            let ds = sum(dc);
            // Σ dy·x̂ = r · (Σ dy·x - μ Σ dy).
            let dsx = (dot(dc, xc) - mean * ds) * rstd;
            dsum[ci] = ds;
            dsum_xhat[ci] = dsx;
            sum_wdy += wc * ds;
            sum_wdy_xhat += wc * dsx;
        }
        let len = self.block().max(1) as f32;
        let (m1, m2) = (sum_wdy / len, sum_wdy_xhat / len);
        for ci in 0..self.cg() {
            let range = ci * s..(ci + 1) * s;
            let (xc, dc) = (&xb[range.clone()], &mut dxb[range]);
            // dx = r·(w dy - m1 - (x - μ) r m2) = (r w) dy + (x · k + k0), per channel.
            let a = rstd * w[c0 + ci];
            let k = -rstd * rstd * m2;
            let k0 = -rstd * m1 + rstd * rstd * m2 * mean;
            for (d, &x) in dc.iter_mut().zip(xc) {
                *d = a * *d + x * k + k0;
            }
        }
    }
}

/// The slices one (sample, group) block's backward reads and writes.
struct BlockGrad<'a> {
    x: &'a [f32],
    grad: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    dx: &'a mut [f32],
    dsum: &'a mut [f32],
    dsum_xhat: &'a mut [f32],
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ddpo-group-norm"
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
        let x = contiguous_f32(xs, xl, xl.shape(), "group_norm input")?;
        let w = contiguous_f32(ws, wl, &self.c.into(), "group_norm weight")?;
        let b = contiguous_f32(bs, bl, &self.c.into(), "group_norm bias")?;
        let len = x.len();
        let mut out = Vec::with_capacity(len);
        let block = self.block();
        if block > 0 {
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(block)
                .zip(x.par_chunks(block))
                .enumerate()
                .for_each(|(i, (ob, xb))| self.forward_block(i % self.groups, xb, w, b, ob));
        }
        // SAFETY: the blocks tile `out` (len is a multiple of the block, 0 when it is), and
        // `forward_block` writes every element of its block.
        unsafe { out.set_len(if block > 0 { len } else { 0 }) };
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = x.shape().clone();
        let (w, b) = (w.detach().to_vec1::<f32>()?, b.detach().to_vec1::<f32>()?);
        let mut dx = vec![0f32; shape.elem_count()];
        // Per (sample, channel) partial sums, reduced over samples below.
        let mut dsum = vec![0f32; self.n * self.c];
        let mut dsum_xhat = vec![0f32; self.n * self.c];
        let (block, cg) = (self.block(), self.cg());
        with_f32(x, "group_norm backward", |x| {
            with_f32(grad, "group_norm backward", |grad| {
                if grad.len() != x.len() {
                    bail!("group_norm backward: gradient has {} elements, input {shape:?}", grad.len());
                }
                if block == 0 {
                    return Ok(());
                }
                dx.par_chunks_mut(block)
                    .zip(x.par_chunks(block).zip(grad.par_chunks(block)))
                    .zip(dsum.par_chunks_mut(cg).zip(dsum_xhat.par_chunks_mut(cg)))
                    .enumerate()
                    .for_each(|(i, ((dxb, (xb, gb)), (ds, dsx)))| {
                        let blk = BlockGrad {
                            x: xb,
                            grad: gb,
                            w: &w,
                            b: &b,
                            dx: dxb,
                            dsum: ds,
                            dsum_xhat: dsx,
                        };
                        self.backward_block(i % self.groups, blk);
                    });
                Ok(())
            })?
        })??;
        let db = sum_rows(&dsum, self.c);
        let dw = sum_rows(&dsum_xhat, self.c);
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dx, shape, &dev)?),
            Some(Tensor::from_vec(dw, self.c, &dev)?),
            Some(Tensor::from_vec(db, self.c, &dev)?),
        ))
    }
}

/// SiLU: y · sigmoid(y).
#[inline(always)]
pub(crate) fn silu(y: f32) -> f32 {
    y / (1.0 + exp(-y))
}

dispatch_avx2! {
    /// One channel of the forward: `out = x · a + shift`, through SiLU when `silu`.
    fn affine_row(a: f32, shift: f32, silu: bool, x: &[f32], out: &mut [MaybeUninit<f32>]) => affine_row_generic
}

#[inline(always)]
fn affine_row_generic(a: f32, shift: f32, fused_silu: bool, x: &[f32], out: &mut [MaybeUninit<f32>]) {
    if fused_silu {
        for (o, &x) in out.iter_mut().zip(x) {
            o.write(silu(x * a + shift));
        }
    } else {
        for (o, &x) in out.iter_mut().zip(x) {
            o.write(x * a + shift);
        }
    }
}

/// d silu / dy = s · (1 + y · (1 - s)), s = sigmoid(y).
#[inline(always)]
pub(crate) fn silu_grad(y: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-y));
    s * (1.0 + y * (1.0 - s))
}
