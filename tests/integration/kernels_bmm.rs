//! Correctness of `ddpo::kernels::bmm` (batched products, one node, hand-written backward)
//! against candle's matmul on explicitly transposed operands: outputs and both gradients for
//! every transpose combination over random shapes, 4-D inputs, f64 (candle's path) and the
//! shape errors.

use crate::common;

use candle_core::{DType, Result, Tensor, Var};
use common::{rand_tensor, rel_err};
use ddpo::kernels::bmm;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f32 = 1e-5;

fn reference(x: &Tensor, tx: bool, y: &Tensor, ty: bool) -> Result<Tensor> {
    let r = x.rank();
    let x = if tx { x.transpose(r - 2, r - 1)?.contiguous()? } else { x.clone() };
    let y = if ty { y.transpose(r - 2, r - 1)?.contiguous()? } else { y.clone() };
    x.matmul(&y)
}

type BmmFn<'a> = &'a dyn Fn(&Tensor, bool, &Tensor, bool) -> Result<Tensor>;

/// Output and gradients of x and y of `loss = sum(f(x, y) * r)`.
fn run(f: BmmFn, x: &Tensor, tx: bool, y: &Tensor, ty: bool, r: &Tensor) -> Result<[Tensor; 3]> {
    let (xv, yv) = (Var::from_tensor(x)?, Var::from_tensor(y)?);
    let out = f(xv.as_tensor(), tx, yv.as_tensor(), ty)?;
    let grads = (&out * r)?.sum_all()?.backward()?;
    let g = |v: &Var| grads.get(v.as_tensor()).expect("missing gradient").clone();
    Ok([out, g(&xv), g(&yv)])
}

fn check(dims: (usize, usize, usize, usize), tx: bool, ty: bool, dtype: DType, rng: &mut ChaCha8Rng) -> Result<()> {
    let (b, m, k, n) = dims;
    let x = rand_tensor(rng, &if tx { [b, k, m] } else { [b, m, k] }, -1.0, 1.0)?.to_dtype(dtype)?;
    let y = rand_tensor(rng, &if ty { [b, n, k] } else { [b, k, n] }, -1.0, 1.0)?.to_dtype(dtype)?;
    let r = rand_tensor(rng, &[b, m, n], -1.0, 1.0)?.to_dtype(dtype)?;
    let ours = run(&|x, tx, y, ty| bmm(x, tx, y, ty), &x, tx, &y, ty, &r)?;
    let theirs = run(&reference, &x, tx, &y, ty, &r)?;
    for (name, (a, e)) in ["out", "dx", "dy"].iter().zip(ours.iter().zip(&theirs)) {
        let err = rel_err(a, e)?;
        assert!(err < TOL, "{dims:?} tx {tx} ty {ty} {dtype:?}: {name} rel err {err:e}");
    }
    Ok(())
}

#[test]
fn matches_candle_for_every_transpose_on_random_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for _ in 0..12 {
        let dims = (rng.random_range(1..=9), rng.random_range(1..=20), rng.random_range(1..=20), rng.random_range(1..=20));
        for (tx, ty) in [(false, false), (false, true), (true, false), (true, true)] {
            check(dims, tx, ty, DType::F32, &mut rng)?;
        }
    }
    Ok(())
}

#[test]
fn f64_falls_back_to_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    check((3, 4, 5, 6), false, true, DType::F64, &mut rng)
}

/// (B, H, L, D) queries and keys, as the attention uses them.
#[test]
fn four_d_attention_scores() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let q = rand_tensor(&mut rng, &[2, 4, 64, 16], -1.0, 1.0)?;
    let k = rand_tensor(&mut rng, &[2, 4, 16, 16], -1.0, 1.0)?;
    let s = bmm(&q, false, &k, true)?;
    assert_eq!(s.dims(), &[2, 4, 64, 16]);
    assert!(rel_err(&s, &q.matmul(&k.t()?)?)? < TOL);
    Ok(())
}

#[test]
fn rejects_mismatched_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let x = rand_tensor(&mut rng, &[2, 3, 4], -1.0, 1.0)?;
    let y = rand_tensor(&mut rng, &[2, 5, 6], -1.0, 1.0)?;
    let err = bmm(&x, false, &y, false).unwrap_err().to_string();
    assert!(err.contains("inner dimensions differ"), "{err}");
    let y = rand_tensor(&mut rng, &[3, 4, 6], -1.0, 1.0)?;
    let err = bmm(&x, false, &y, false).unwrap_err().to_string();
    assert!(err.contains("leading dimensions"), "{err}");
    Ok(())
}
