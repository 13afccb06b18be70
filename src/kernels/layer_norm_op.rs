//! Layer norm over the last dimension as one autograd node, with a hand-written backward.
//!
//! candle-nn's differentiable `layer_norm_slow` is eleven graph nodes (reductions, broadcasts,
//! the affine), each of which costs a pass over the activations forward and a gradient pass
//! plus an accumulation into a zeroed buffer backward; its fused `layer_norm` has no backward.
//! [`LayerNormOp`] normalises each row in one pass and computes all three gradients in one
//! more, recomputing each row's statistics from the saved input.
//!
//! With `x̂ = (x - μ) · r` per row, `y = w ⊙ x̂ + b` and upstream gradient `dy`:
//! `dx = r · (w dy - mean(w dy) - x̂ · mean(w dy · x̂))`, `dw = Σ_rows dy · x̂`, `db = Σ_rows dy`.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::contiguous_f32;
use super::slices::{sum, sum_rows, sum_sq_dev, with_f32};

/// Layer norm of a contiguous f32 CPU tensor over its last dimension, of length `d`.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormOp {
    pub d: usize,
    pub eps: f32,
}

/// Rows per parallel task in backward: each task keeps one partial (dw, db) pair.
const ROWS_PER_TASK: usize = 64;

impl LayerNormOp {
    /// Mean and 1/sqrt(var + eps) of one row.
    fn stats(&self, row: &[f32]) -> (f32, f32) {
        let len = row.len().max(1) as f32;
        let mean = sum(row) / len;
        (mean, 1.0 / (sum_sq_dev(row, mean) / len + self.eps).sqrt())
    }

    /// Backward over a run of rows: writes their dx, adds their dw, db into `dwb` (2 * d).
    fn backward_rows(&self, x: &[f32], grad: &[f32], w: &[f32], dx: &mut [f32], dwb: &mut [f32]) {
        let d = self.d;
        let (dw, db) = dwb.split_at_mut(d);
        let rows = x.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
        for ((xr, gr), dr) in rows {
            let (mean, rstd) = self.stats(xr);
            let (mut m1, mut m2) = (0f32, 0f32);
            for i in 0..d {
                let xhat = (xr[i] - mean) * rstd;
                let wdy = w[i] * gr[i];
                m1 += wdy;
                m2 += wdy * xhat;
                dw[i] += gr[i] * xhat;
                db[i] += gr[i];
            }
            let (m1, m2) = (m1 / d as f32, m2 / d as f32);
            for i in 0..d {
                let xhat = (xr[i] - mean) * rstd;
                dr[i] = rstd * (w[i] * gr[i] - m1 - xhat * m2);
            }
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ddpo-layer-norm"
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
        let x = contiguous_f32(xs, xl, xl.shape(), "layer_norm input")?;
        let w = contiguous_f32(ws, wl, &self.d.into(), "layer_norm weight")?;
        let b = contiguous_f32(bs, bl, &self.d.into(), "layer_norm bias")?;
        let mut out = vec![0f32; x.len()];
        if self.d > 0 {
            out.par_chunks_mut(self.d)
                .zip(x.par_chunks(self.d))
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(o, xr)| {
                    let (mean, rstd) = self.stats(xr);
                    for (((o, &x), &w), &b) in o.iter_mut().zip(xr).zip(w).zip(b) {
                        *o = (x - mean) * rstd * w + b;
                    }
                });
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.d;
        let w = w.detach().to_vec1::<f32>()?;
        let mut dx = vec![0f32; x.elem_count()];
        let tasks = (x.elem_count() / d.max(1)).div_ceil(ROWS_PER_TASK);
        // One (dw, db) partial per task, summed below.
        let mut partial = vec![0f32; tasks * 2 * d];
        let chunk = ROWS_PER_TASK * d;
        with_f32(x, "layer_norm backward", |x| {
            with_f32(grad, "layer_norm backward", |g| {
                if d == 0 {
                    return;
                }
                dx.par_chunks_mut(chunk)
                    .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                    .zip(partial.par_chunks_mut(2 * d))
                    .for_each(|((dxc, (xc, gc)), dwb)| self.backward_rows(xc, gc, &w, dxc, dwb));
            })
        })??;
        let dwb = sum_rows(&partial, 2 * d);
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), &dev)?),
            Some(Tensor::from_slice(&dwb[..d], d, &dev)?),
            Some(Tensor::from_slice(&dwb[d..], d, &dev)?),
        ))
    }
}
