//! The GEGLU gate of the transformers' feed-forward, `a ⊙ gelu(g)` for `h = [a, g]`, as one
//! autograd node with a hand-written backward.
//!
//! Composed in candle it is a `chunk` into two strided views, `gelu_erf` (a scalar libm `erf`
//! per element) and a multiply; backward, each view's gradient is zero-padded back to the full
//! width and the two are summed. [`GegluOp`] reads each row of `h` once and writes the gate,
//! and its backward writes both halves of `dh` in one pass:
//! `da = dy ⊙ gelu(g)`, `dg = dy ⊙ a ⊙ gelu'(g)`, with `gelu(x) = x Φ(x)` and
//! `gelu'(x) = Φ(x) + x φ(x)` (Φ, φ the standard normal CDF and density).
//!
//! Φ is exact-erf GELU's, computed as `Φ(x) = erfc(-x/√2) / 2` with the Chebyshev fit of
//! Numerical Recipes' `erfcc` (fractional error below 1.2e-7 everywhere) on top of the
//! project's vectorisable exp: `x Φ(x)` then keeps its relative accuracy for negative `x`,
//! where `1 + erf` would cancel.

use candle_core::{bail, CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::im2col::contiguous_f32;
use super::simd::dispatch_avx2;
use super::slices::{exp, with_f32};
use super::{all_cpu_f32, alloc};

/// `h[.., ..inner] ⊙ gelu(h[.., inner..])` for `h` of shape (.., 2·inner), exact-erf GELU.
///
/// Differentiable with respect to `h`. Returns (.., inner). CPU f32 runs one fused node; other
/// devices and dtypes run the composed `chunk`, `gelu_erf`, multiply.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = match h.dims().last() {
        Some(&w) if w % 2 == 0 => w,
        _ => bail!("geglu: input must have an even last dimension (2 x inner), got {:?}", h.dims()),
    };
    if !all_cpu_f32(&[Some(h)]) {
        let chunks = h.chunk(2, D::Minus1)?;
        return &chunks[0] * chunks[1].gelu_erf()?;
    }
    alloc::reuse_freed_memory();
    h.contiguous()?.apply_op1(GegluOp { inner: width / 2 })
}

/// GEGLU over rows of `2 · inner` of a contiguous f32 CPU tensor.
#[derive(Debug, Clone, Copy)]
pub struct GegluOp {
    /// Width of the output: half the input's last dimension.
    pub inner: usize,
}

/// Rows per parallel task (a row is a few hundred elements).
const ROWS_PER_TASK: usize = 16;

impl GegluOp {
    /// The output shape: the input's with its last dimension halved.
    fn out_shape(&self, input: &Shape) -> Result<Shape> {
        let mut dims = input.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == 2 * self.inner => *last = self.inner,
            _ => bail!("geglu: expected a last dimension of {}, got input {input:?}", 2 * self.inner),
        }
        Ok(dims.into())
    }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "ddpo-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(s, l, l.shape(), "geglu input")?;
        let shape = self.out_shape(l.shape())?;
        let n = self.inner;
        let mut out = vec![0f32; h.len() / 2];
        if n > 0 {
            out.par_chunks_mut(n)
                .zip(h.par_chunks(2 * n))
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(o, hr)| forward_row(hr, o));
        }
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = self.inner;
        let mut dh = vec![0f32; h.elem_count()];
        if n > 0 {
            with_f32(h, "geglu backward", |h| {
                with_f32(grad, "geglu backward", |dy| {
                    dh.par_chunks_mut(2 * n)
                        .zip(h.par_chunks(2 * n).zip(dy.par_chunks(n)))
                        .with_min_len(ROWS_PER_TASK)
                        .for_each(|(dr, (hr, dyr))| backward_row(hr, dyr, dr));
                })
            })??;
        }
        Ok(Some(Tensor::from_vec(dh, h.shape(), &Device::Cpu)?))
    }
}

dispatch_avx2! {
    /// One row: `out = a ⊙ gelu(g)` for `h = [a, g]`.
    fn forward_row(h: &[f32], out: &mut [f32]) => forward_row_generic
}

#[inline(always)]
fn forward_row_generic(h: &[f32], out: &mut [f32]) {
    let (a, g) = h.split_at(out.len());
    for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
        *o = a * g * phi_cdf(g);
    }
}

dispatch_avx2! {
    /// One row: `dh = [dy ⊙ gelu(g), dy ⊙ a ⊙ gelu'(g)]` for `h = [a, g]`.
    fn backward_row(h: &[f32], dy: &[f32], dh: &mut [f32]) => backward_row_generic
}

#[inline(always)]
fn backward_row_generic(h: &[f32], dy: &[f32], dh: &mut [f32]) {
    let n = dy.len();
    let (a, g) = h.split_at(n);
    let (da, dg) = dh.split_at_mut(n);
    for ((((da, dg), &a), &g), &dy) in da.iter_mut().zip(dg).zip(a).zip(g).zip(dy) {
        let cdf = phi_cdf(g);
        let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * g * g);
        *da = dy * g * cdf;
        *dg = dy * a * (cdf + g * pdf);
    }
}

/// 1/√(2π), the standard normal density's factor.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Φ(x), the standard normal CDF, as `erfc(-x/√2) / 2` (relative error ~1e-7 where Φ is
/// small, absolute ~1e-7 near 1). Branch-free so that loops calling it vectorise.
#[inline(always)]
pub(crate) fn phi_cdf(x: f32) -> f32 {
    let half_erfc = 0.5 * erfc_pos(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    // erfc(-z) = 2 - erfc(z).
    if x >= 0.0 {
        1.0 - half_erfc
    } else {
        half_erfc
    }
}

/// erfc(z) for z >= 0: Numerical Recipes' `erfcc`, `t · exp(-z² + P(t))` with t = 1/(1 + z/2),
/// fractional error below 1.2e-7. Past z ≈ 9.3 the exp underflows to its clamp (~1e-38).
#[inline(always)]
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = 0.170_872_77f32;
    p = p * t - 0.822_152_23;
    p = p * t + 1.488_515_87;
    p = p * t - 1.135_203_98;
    p = p * t + 0.278_868_07;
    p = p * t - 0.186_288_06;
    p = p * t + 0.096_784_18;
    p = p * t + 0.374_091_96;
    p = p * t + 1.000_023_68;
    p = p * t - 1.265_512_23;
    t * exp(-z * z + p)
}
