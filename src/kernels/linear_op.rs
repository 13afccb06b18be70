//! The linear layer `y = x W^T + b` as one autograd node, with a hand-written backward pass.
//!
//! candle-nn's `Linear` is four graph nodes (transpose, matmul, broadcast, add). In backward,
//! candle accumulates each node's gradient into a freshly zeroed buffer, so the (rows, out)
//! output gradient is zeroed and added twice more, and the bias gradient is a strided sum over
//! the broadcast rows, all of it slower than the three products it accompanies. Here the bias
//! initialises the output rows that gemm then adds the product into, and backward is three
//! plain gemm calls plus a contiguous row sum.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Tensor};

use super::im2col::contiguous_f32;
use super::product::Product;
use super::slices::{sum_rows, with_f32};

/// `x (m, k) @ w^T + b` for contiguous f32 CPU tensors, `w` being (o, k) and `b` (o,).
#[derive(Debug, Clone, Copy)]
pub struct LinearOp {
    pub m: usize,
    pub k: usize,
    pub o: usize,
}

impl LinearOp {
    fn x_shape(&self) -> Shape {
        (self.m, self.k).into()
    }

    fn w_shape(&self) -> Shape {
        (self.o, self.k).into()
    }

    /// (m, o) rows: the bias repeated (or zeros), plus x @ w^T.
    fn forward_vec(&self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let mut out = match b {
            Some(b) => b.repeat(self.m),
            None => vec![0f32; self.m * self.o],
        };
        let product = Product { m: self.m, n: self.o, k: self.k, lhs: (x, self.k, 1), rhs: (w, 1, self.k) };
        product.run(&mut out, b.is_some(), true);
        out
    }

    /// Gradients of x (m, k) and w (o, k) given the output gradient (m, o).
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let (m, k, o) = (self.m, self.k, self.o);
        let (dx, dw) = with_f32(grad, "linear backward", |g| {
            let dx = with_f32(w, "linear backward", |w| {
                let mut dx = vec![0f32; m * k];
                Product { m, n: k, k: o, lhs: (g, o, 1), rhs: (w, k, 1) }.run(&mut dx, false, true);
                dx
            })?;
            let dw = with_f32(x, "linear backward", |x| {
                let mut dw = vec![0f32; o * k];
                Product { m: o, n: k, k: m, lhs: (g, 1, o), rhs: (x, k, 1) }.run(&mut dw, false, true);
                dw
            })?;
            Ok::<_, candle_core::Error>((dx, dw))
        })??;
        Ok((
            Tensor::from_vec(dx, self.x_shape(), &Device::Cpu)?,
            Tensor::from_vec(dw, self.w_shape(), &Device::Cpu)?,
        ))
    }

    fn inputs<'a>(
        &self,
        (xs, xl): (&'a CpuStorage, &Layout),
        (ws, wl): (&'a CpuStorage, &Layout),
    ) -> Result<(&'a [f32], &'a [f32])> {
        let x = contiguous_f32(xs, xl, &self.x_shape(), "linear input")?;
        let w = contiguous_f32(ws, wl, &self.w_shape(), "linear weight")?;
        Ok((x, w))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "ddpo-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = self.inputs((xs, xl), (ws, wl))?;
        Ok((CpuStorage::F32(self.forward_vec(x, w, None)), (self.m, self.o).into()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// [`LinearOp`] with its bias, as the third input.
#[derive(Debug, Clone, Copy)]
pub struct LinearBiasOp(pub LinearOp);

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "ddpo-linear-bias"
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
        let op = &self.0;
        let (x, w) = op.inputs((xs, xl), (ws, wl))?;
        let b = contiguous_f32(bs, bl, &op.o.into(), "linear bias")?;
        Ok((CpuStorage::F32(op.forward_vec(x, w, Some(b))), (op.m, op.o).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.0.backward(x, w, grad)?;
        let db = with_f32(grad, "linear bias backward", |g| sum_rows(g, self.0.o))?;
        Ok((Some(dx), Some(dw), Some(Tensor::from_vec(db, self.0.o, &Device::Cpu)?)))
    }
}
