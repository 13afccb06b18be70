//! Batched matrix products of many small matrices (the attention's per-head q·kᵀ and p·v), as
//! one autograd node.
//!
//! candle's batched matmul calls gemm once per batch item, each call spreading its few
//! thousand multiply-adds over rayon's threads: for the UNet's 8x8 attention (64 tokens, 16
//! dims per head, 4 heads per image) the thread hand-offs cost more than the arithmetic.
//! [`BmmOp`] instead runs whole items on each thread, gemm single-threaded, and reads
//! transposed operands through their strides instead of copying them.

use candle_core::{bail, CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::im2col::contiguous_f32;
use super::product::Product;
use super::slices::with_f32;

/// `op(x) @ op(y)` per batch item, where `op(x)` is x, stored (m, k), or xᵀ with x stored
/// (k, m) when `tx`; likewise `op(y)` (k, n) from y stored (k, n) or, when `ty`, (n, k).
#[derive(Debug, Clone, Copy)]
pub struct BmmOp {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub tx: bool,
    pub ty: bool,
}

impl BmmOp {
    fn x_dims(&self) -> (usize, usize) {
        if self.tx { (self.k, self.m) } else { (self.m, self.k) }
    }

    fn y_dims(&self) -> (usize, usize) {
        if self.ty { (self.n, self.k) } else { (self.k, self.n) }
    }

    fn x_shape(&self) -> Shape {
        let (r, c) = self.x_dims();
        (self.batch, r, c).into()
    }

    fn y_shape(&self) -> Shape {
        let (r, c) = self.y_dims();
        (self.batch, r, c).into()
    }

    /// The products, (batch, m, n) row-major.
    fn run(&self, x: &[f32], y: &[f32]) -> Vec<f32> {
        let (m, k, n) = (self.m, self.k, self.n);
        let mut out = vec![0f32; self.batch * m * n];
        if m * n == 0 || k == 0 {
            return out;
        }
        // (row, column) strides of op(x) and op(y) inside one stored item.
        let (xrs, xcs) = if self.tx { (1, m) } else { (k, 1) };
        let (yrs, ycs) = if self.ty { (1, k) } else { (n, 1) };
        out.par_chunks_mut(m * n)
            .zip(x.par_chunks(m * k))
            .zip(y.par_chunks(k * n))
            .for_each(|((dst, xs), ys)| {
                Product { m, n, k, lhs: (xs, xrs, xcs), rhs: (ys, yrs, ycs) }.run(dst, false, false);
            });
        out
    }

    /// `op(a) @ op(b)` of two tensors as stored, through a new [`BmmOp`].
    fn product(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Result<Tensor> {
        let (batch, ar, ac) = a.dims3()?;
        let (_, br, bc) = b.dims3()?;
        let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
        let n = if tb { br } else { bc };
        let op = BmmOp { batch, m, k, n, tx: ta, ty: tb };
        let out = with_f32(a, "bmm backward", |a| with_f32(b, "bmm backward", |b| op.run(a, b)))??;
        Tensor::from_vec(out, (batch, m, n), &Device::Cpu)
    }
}

impl CustomOp2 for BmmOp {
    fn name(&self) -> &'static str {
        "ddpo-bmm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ys: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, &self.x_shape(), "bmm lhs")?;
        let y = contiguous_f32(ys, yl, &self.y_shape(), "bmm rhs")?;
        if x.len() != self.batch * self.m * self.k || y.len() != self.batch * self.k * self.n {
            bail!("bmm: operand sizes do not match {self:?}");
        }
        Ok((CpuStorage::F32(self.run(x, y)), (self.batch, self.m, self.n).into()))
    }

    /// With C = op(X) op(Y): dop(X) = dC op(Y)ᵀ and dop(Y) = op(X)ᵀ dC, transposed back when
    /// the operand is stored transposed.
    fn bwd(&self, x: &Tensor, y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (x, y) = (x.detach(), y.detach());
        let dx = if self.tx { Self::product(&y, self.ty, &g, true)? } else { Self::product(&g, false, &y, !self.ty)? };
        let dy = if self.ty { Self::product(&g, true, &x, self.tx)? } else { Self::product(&x, !self.tx, &g, false)? };
        Ok((Some(dx), Some(dy)))
    }
}
