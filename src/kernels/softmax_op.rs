//! Scaled softmax over the last dimension, optionally after an additive mask, as one
//! autograd node with a hand-written backward: the attention probabilities.
//!
//! candle-nn's differentiable `softmax` is five graph nodes (max, sub, exp, sum, div), and the
//! attention put two more in front of it (the 1/√d scale and the mask add). Each costs a pass
//! over the scores forward and, backward, a gradient pass plus an accumulation into a zeroed
//! buffer. [`SoftmaxOp`] computes `y = softmax(s · x + mask)` row by row in one node, and its
//! backward is the closed form `dx = s · y ⊙ (g - Σ g ⊙ y)` from the saved output `y`.
//!
//! Masked entries may be `-inf` (the text encoder's causal mask): they come out exactly 0 and
//! get a zero gradient. A row that is masked everywhere is NaN, as in candle and PyTorch. The
//! mask is usually a constant; its gradient (the same closed form, summed over the rows that
//! share it) is computed only when the mask is part of a graph.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::im2col::contiguous_f32;
use super::simd::dispatch_avx2;
use super::slices::{dot, exp, sum, with_f32};
use super::{all_cpu_f32, alloc};

/// `softmax(scale · x + mask)` over the last dimension of `x`.
///
/// `mask`, if given, is added to the scaled scores; a `(Lq, Lk)` mask matching the last two
/// dimensions of `x` (the attention case) is fused into the node, any other shape that
/// broadcasts against `x` is added beforehand. Differentiable with respect to `x` and the mask.
/// CPU f32 runs one fused node; other devices and dtypes run candle-nn's composed softmax.
pub fn softmax_last_dim(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let (lq, lk) = match dims {
        [.., lq, lk] => (*lq, *lk),
        [lk] => (1, *lk),
        [] => bail!("softmax_last_dim: input must have at least one dimension, got a scalar"),
    };
    let fused_mask = mask.filter(|m| m.dims() == [lq, lk] && all_cpu_f32(&[Some(m)]));
    if !all_cpu_f32(&[Some(x)]) || (mask.is_some() && fused_mask.is_none()) {
        return composed(x, scale, mask);
    }
    alloc::reuse_freed_memory();
    let op = SoftmaxOp { len: lk, scale: scale as f32 };
    match fused_mask {
        Some(m) => x.contiguous()?.apply_op2(&m.contiguous()?, MaskedSoftmaxOp { op, rows: lq }),
        None => x.contiguous()?.apply_op1(op),
    }
}

/// The composed reference path: scale, broadcast mask add, candle-nn's softmax.
fn composed(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let x = if scale == 1.0 { x.clone() } else { (x * scale)? };
    let x = match mask {
        Some(m) => x.broadcast_add(m).map_err(|e| {
            e.context(format!("softmax_last_dim: mask {:?} does not broadcast to {:?}", m.dims(), x.dims()))
        })?,
        None => x,
    };
    candle_nn::ops::softmax(&x, D::Minus1)
}

/// Scaled softmax over rows of `len` of a contiguous f32 CPU tensor.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxOp {
    /// Length of the last dimension (a row).
    pub len: usize,
    /// Factor on the scores before the softmax (the attention's 1/√d).
    pub scale: f32,
}

/// [`SoftmaxOp`] after adding a `(rows, len)` mask, repeated over the leading dimensions.
#[derive(Debug, Clone, Copy)]
pub struct MaskedSoftmaxOp {
    pub op: SoftmaxOp,
    /// Rows of the mask (the query length): row `r` of the input takes mask row `r % rows`.
    pub rows: usize,
}

/// Rows per parallel task: attention rows are short (16 to a few hundred entries).
const ROWS_PER_TASK: usize = 64;

/// Entries this far below the row's maximum have e^x under f32's normal range: they are 0
/// exactly (a `-inf` mask entry must give 0, not the clamped exp's 1e-38).
const EXP_CUTOFF: f32 = -87.0;

impl SoftmaxOp {
    /// Forward over contiguous rows, the mask (if any) being `mask_rows` rows repeated.
    fn forward(&self, x: &[f32], mask: Option<(&[f32], usize)>) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        let len = self.len;
        if len == 0 {
            return out;
        }
        out.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(r, (o, xr))| {
                let m = mask.map(|(m, rows)| &m[(r % rows) * len..][..len]);
                forward_row(self.scale, xr, m, o);
            });
        out
    }

    /// `factor · y ⊙ (g - Σ g ⊙ y)`: with factor 1 the gradient with respect to the masked,
    /// scaled scores, with factor `scale` the one with respect to the input.
    fn backward(&self, y: &Tensor, grad: &Tensor, factor: f32) -> Result<Tensor> {
        let len = self.len;
        let mut dz = vec![0f32; y.elem_count()];
        if len > 0 {
            with_f32(y, "softmax backward", |y| {
                with_f32(grad, "softmax backward", |g| {
                    dz.par_chunks_mut(len)
                        .zip(y.par_chunks(len).zip(g.par_chunks(len)))
                        .with_min_len(ROWS_PER_TASK)
                        .for_each(|(d, (yr, gr))| backward_row(factor, yr, gr, d));
                })
            })??;
        }
        Tensor::from_vec(dz, y.shape(), &Device::Cpu)
    }
}

dispatch_avx2! {
    /// One row: `out = softmax(scale · x + mask)`.
    fn forward_row(scale: f32, x: &[f32], mask: Option<&[f32]>, out: &mut [f32]) => forward_row_generic
}

#[inline(always)]
fn forward_row_generic(scale: f32, x: &[f32], mask: Option<&[f32]>, out: &mut [f32]) {
    match mask {
        Some(m) => {
            for ((o, &v), &mv) in out.iter_mut().zip(x).zip(m) {
                *o = v * scale + mv;
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * scale;
            }
        }
    }
    let m = max(out);
    for o in out.iter_mut() {
        let z = *o - m;
        // Branch-free select so that the loop vectorises; NaN (a fully masked row) stays NaN.
        *o = if z < EXP_CUTOFF { 0.0 } else { exp(z) };
    }
    let inv = 1.0 / sum(out);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

dispatch_avx2! {
    /// One row of the backward: `d = factor · y ⊙ (g - Σ g ⊙ y)`.
    fn backward_row(factor: f32, y: &[f32], g: &[f32], d: &mut [f32]) => backward_row_generic
}

#[inline(always)]
fn backward_row_generic(factor: f32, y: &[f32], g: &[f32], d: &mut [f32]) {
    let s = dot(g, y);
    for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
        *d = factor * y * (g - s);
    }
}

/// max of a slice in independent lanes (vectorises; f32::max ignores NaN, which then shows up
/// in the exp instead). `-inf` for an empty slice.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    acc.iter().fold(rest, |a, &v| a.max(v))
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "ddpo-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, l.shape(), "softmax input")?;
        Ok((CpuStorage::F32(self.forward(x, None)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(res, grad, self.scale)?))
    }
}

impl CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "ddpo-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, xl.shape(), "masked softmax input")?;
        let mask_shape: Shape = (self.rows, self.op.len).into();
        let m = contiguous_f32(ms, ml, &mask_shape, "masked softmax mask")?;
        if self.rows == 0 || x.len() % (self.rows * self.op.len).max(1) != 0 {
            bail!("masked softmax: mask {mask_shape:?} does not tile input {:?}", xl.shape());
        }
        Ok((CpuStorage::F32(self.op.forward(x, Some((m, self.rows)))), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        mask: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.op.backward(res, grad, self.op.scale)?;
        // The mask is normally a constant: skip its reduction unless a graph wants it.
        let dmask = if mask.track_op() {
            let dz = self.op.backward(res, grad, 1.0)?;
            let copies = x.elem_count() / (self.rows * self.op.len).max(1);
            Some(dz.reshape((copies, self.rows, self.op.len))?.sum(0)?)
        } else {
            None
        };
        Ok((Some(dx), dmask))
    }
}
