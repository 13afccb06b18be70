//! Correctness of `ddpo::kernels::linear` (one fused node, hand-written backward) against the
//! composed candle path it replaces (`x.matmul(w.t())` then a broadcast bias add): outputs and
//! the gradients of x, w and b over random shapes, without a bias, on non-contiguous inputs,
//! in f64 (which falls back to candle), on 3-D inputs through `layers::Linear`, and the
//! shape errors.

use crate::common;

use candle_core::{DType, Module, Result, Tensor, Var};
use common::{rand_tensor, rel_err};
use ddpo::kernels::linear;
use ddpo::model::layers::Linear;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f32 = 1e-5;

fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

type LinearFn<'a> = &'a dyn Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;

/// Output and the gradients of x, w (and b) of `loss = sum(f(x, w, b) * r)`.
fn run(f: LinearFn, x: &Tensor, w: &Tensor, b: Option<&Tensor>, r: &Tensor) -> Result<Vec<Tensor>> {
    let (xv, wv) = (Var::from_tensor(x)?, Var::from_tensor(w)?);
    let bv = b.map(Var::from_tensor).transpose()?;
    let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_ref().map(|b| b.as_tensor()))?;
    let grads = (&y * r)?.sum_all()?.backward()?;
    let mut out = vec![y.clone()];
    for v in [Some(&xv), Some(&wv), bv.as_ref()].into_iter().flatten() {
        out.push(grads.get(v.as_tensor()).expect("missing gradient").clone());
    }
    Ok(out)
}

fn check(x: &Tensor, w: &Tensor, b: Option<&Tensor>, rng: &mut ChaCha8Rng, what: &str) -> Result<()> {
    let r = rand_tensor(rng, &[x.dim(0)?, w.dim(0)?], -1.0, 1.0)?.to_dtype(x.dtype())?;
    let ours = run(&|x, w, b| linear(x, w, b), x, w, b, &r)?;
    let theirs = run(&reference, x, w, b, &r)?;
    for (name, (a, e)) in ["out", "dx", "dw", "db"].iter().zip(ours.iter().zip(&theirs)) {
        let err = rel_err(a, e)?;
        assert!(err < TOL, "{what}: {name} rel err {err:e}");
    }
    Ok(())
}

#[test]
fn matches_candle_on_random_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for i in 0..40 {
        let (m, k, o) = (rng.random_range(1..=70), rng.random_range(1..=40), rng.random_range(1..=40));
        let x = rand_tensor(&mut rng, &[m, k], -1.0, 1.0)?;
        let w = rand_tensor(&mut rng, &[o, k], -1.0, 1.0)?;
        let b = rand_tensor(&mut rng, &[o], -1.0, 1.0)?;
        let bias = (i % 2 == 0).then_some(&b);
        check(&x, &w, bias, &mut rng, &format!("m {m} k {k} o {o} bias {}", bias.is_some()))?;
    }
    Ok(())
}

#[test]
fn matches_candle_at_attention_sizes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = rand_tensor(&mut rng, &[4096, 64], -1.0, 1.0)?;
    let w = rand_tensor(&mut rng, &[512, 64], -0.1, 0.1)?;
    let b = rand_tensor(&mut rng, &[512], -0.1, 0.1)?;
    check(&x, &w, Some(&b), &mut rng, "4096x64 -> 512")
}

#[test]
fn handles_non_contiguous_inputs() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = rand_tensor(&mut rng, &[9, 13], -1.0, 1.0)?.t()?;
    let w = rand_tensor(&mut rng, &[9, 11], -1.0, 1.0)?.t()?;
    let b = rand_tensor(&mut rng, &[22], -1.0, 1.0)?.narrow(0, 3, 11)?;
    check(&x, &w, Some(&b), &mut rng, "transposed x and w, narrowed b")
}

#[test]
fn f64_falls_back_to_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = rand_tensor(&mut rng, &[5, 3], -1.0, 1.0)?.to_dtype(DType::F64)?;
    let w = rand_tensor(&mut rng, &[4, 3], -1.0, 1.0)?.to_dtype(DType::F64)?;
    let b = rand_tensor(&mut rng, &[4], -1.0, 1.0)?.to_dtype(DType::F64)?;
    check(&x, &w, Some(&b), &mut rng, "f64")
}

/// `layers::Linear` applies the kernel to the last dimension of any input.
#[test]
fn layer_works_on_3d_inputs() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let x = rand_tensor(&mut rng, &[2, 5, 6], -1.0, 1.0)?;
    let w = rand_tensor(&mut rng, &[3, 6], -1.0, 1.0)?;
    let b = rand_tensor(&mut rng, &[3], -1.0, 1.0)?;
    let y = Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
    assert_eq!(y.dims(), &[2, 5, 3]);
    let expected = reference(&x.reshape((10, 6))?, &w, Some(&b))?.reshape((2, 5, 3))?;
    assert!(rel_err(&y, &expected)? < TOL);
    Ok(())
}

#[test]
fn rejects_bad_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let x = rand_tensor(&mut rng, &[4, 3], -1.0, 1.0)?;
    let w = rand_tensor(&mut rng, &[2, 5], -1.0, 1.0)?;
    let err = linear(&x, &w, None).unwrap_err().to_string();
    assert!(err.contains("3 features") && err.contains("expects 5"), "{err}");
    let w = rand_tensor(&mut rng, &[2, 3], -1.0, 1.0)?;
    let b = rand_tensor(&mut rng, &[3], -1.0, 1.0)?;
    let err = linear(&x, &w, Some(&b)).unwrap_err().to_string();
    assert!(err.contains("bias must be (2,)"), "{err}");
    Ok(())
}
