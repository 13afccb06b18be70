//! Correctness of `ddpo::kernels::group_norm` (with and without the fused SiLU) against the
//! composed candle path (candle-nn's GroupNorm, then `silu`): forward values and all three
//! gradients over randomised shapes, a finite-difference check, non-contiguous and f64 inputs,
//! and shape errors. Also `ddpo::kernels::layer_norm` against candle-nn's `layer_norm_slow`.

use crate::common;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use ddpo::kernels::{group_norm, layer_norm};
use common::{rand_tensor, rel_err};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f32 = 1e-4;



/// One GroupNorm problem: input, affine parameters, and the upstream gradient `r`.
struct Problem {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    r: Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
}

type Norm<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// Output and gradients (x, w, b) of `loss = sum(norm(x, w, b) * r)`.
fn run(norm: Norm, p: &Problem) -> Result<[Tensor; 4]> {
    let (xv, wv, bv) = (Var::from_tensor(&p.x)?, Var::from_tensor(&p.w)?, Var::from_tensor(&p.b)?);
    let out = norm(xv.as_tensor(), wv.as_tensor(), bv.as_tensor())?;
    let grads = (&out * &p.r)?.sum_all()?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("missing gradient").clone();
    Ok([out, grad(&xv), grad(&wv), grad(&bv)])
}

fn ours(p: &Problem) -> impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + '_ {
    move |x, w, b| group_norm(x, w, b, p.groups, p.eps, p.silu)
}

/// candle-nn's composed GroupNorm, then SiLU: the semantics the fused op must reproduce.
fn reference(p: &Problem) -> impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + '_ {
    move |x, w, b| {
        let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), x.dim(1)?, p.groups, p.eps)?;
        let y = gn.forward(x)?;
        if p.silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// Asserts that the op's output and gradients match the reference's.
fn check(p: &Problem, what: &str) -> Result<()> {
    let got = run(&ours(p), p)?;
    let want = run(&reference(p), p)?;
    for (name, (g, w)) in ["out", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
        let e = rel_err(g, w)?;
        assert!(e < TOL, "{what}: {name} rel err {e:e}");
    }
    Ok(())
}

/// A random problem; x is offset and scaled so that the mean and variance matter.
fn problem(rng: &mut ChaCha8Rng, dims: &[usize], groups: usize, silu: bool) -> Result<Problem> {
    let c = dims[1];
    let offset = rng.random_range(-3.0f32..3.0);
    let scale = rng.random_range(0.1f32..4.0);
    let x = ((rand_tensor(rng, dims, -1.0, 1.0)? * scale as f64)? + offset as f64)?;
    Ok(Problem {
        x,
        w: rand_tensor(rng, &[c], -1.5, 1.5)?,
        b: rand_tensor(rng, &[c], -1.0, 1.0)?,
        r: rand_tensor(rng, dims, -1.0, 1.0)?,
        groups,
        eps: 1e-5,
        silu,
    })
}

/// Randomised shapes: N 1-4, 1-8 groups of 1-4 channels (so groups == C occurs), one or two
/// spatial dims of odd and even sizes, with and without SiLU.
#[test]
fn matches_candle_over_random_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..40 {
        let n = rng.random_range(1..=4);
        let groups = rng.random_range(1..=8);
        let c = groups * rng.random_range(1..=4);
        let mut dims = vec![n, c, rng.random_range(1..=9)];
        if rng.random_bool(0.7) {
            dims.push(rng.random_range(1..=9));
        }
        let silu = case % 2 == 0;
        let p = problem(&mut rng, &dims, groups, silu)?;
        check(&p, &format!("case {case}: dims {dims:?}, {groups} groups, silu {silu}"))?;
    }
    Ok(())
}

/// The UNet's shapes: 32 groups of one channel at 32x32 and of two at 16x16, eps 1e-6.
#[test]
fn matches_candle_at_model_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (dims, silu) in [([2, 32, 32, 32], true), ([2, 64, 16, 16], false)] {
        let mut p = problem(&mut rng, &dims, 32, silu)?;
        p.eps = 1e-6;
        check(&p, &format!("dims {dims:?}, silu {silu}"))?;
    }
    Ok(())
}

/// Central differences of the loss along random directions agree with the gradients.
#[test]
fn finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for silu in [false, true] {
        let p = problem(&mut rng, &[2, 4, 3, 3], 2, silu)?;
        let [_, gx, gw, gb] = run(&ours(&p), &p)?;
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<f64> {
            let y = group_norm(x, w, b, p.groups, p.eps, p.silu)?;
            let y = (y.to_dtype(DType::F64)? * p.r.to_dtype(DType::F64)?)?;
            y.sum_all()?.to_scalar::<f64>()
        };
        let eps = 1e-2;
        for (i, grad) in [gx, gw, gb].iter().enumerate() {
            let v = rand_tensor(&mut rng, grad.dims(), -1.0, 1.0)?;
            let mut args = [p.x.clone(), p.w.clone(), p.b.clone()];
            let base = args[i].clone();
            args[i] = (&base + (&v * eps)?)?;
            let up = loss(&args[0], &args[1], &args[2])?;
            args[i] = (&base - (&v * eps)?)?;
            let down = loss(&args[0], &args[1], &args[2])?;
            let numeric = (up - down) / (2.0 * eps);
            let analytic = (grad * &v)?.sum_all()?.to_scalar::<f32>()? as f64;
            let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
            assert!(err < 2e-3, "silu {silu}, arg {i}: fd {numeric} vs grad {analytic}");
        }
    }
    Ok(())
}

/// A transposed (non-contiguous) input gives the same result as its contiguous copy.
#[test]
fn non_contiguous_input() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut p = problem(&mut rng, &[2, 6, 5, 7], 3, true)?;
    p.x = p.x.transpose(2, 3)?;
    p.r = p.r.transpose(2, 3)?.contiguous()?;
    assert!(!p.x.is_contiguous());
    check(&p, "transposed input")
}

/// Non-f32 inputs fall back to candle's composed path.
#[test]
fn f64_falls_back_to_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let p = problem(&mut rng, &[2, 4, 3, 5], 2, true)?;
    let to64 = |t: &Tensor| t.to_dtype(DType::F64);
    let (x, w, b) = (to64(&p.x)?, to64(&p.w)?, to64(&p.b)?);
    let a = group_norm(&x, &w, &b, 2, 1e-5, true)?;
    let want = group_norm(&p.x, &p.w, &p.b, 2, 1e-5, true)?;
    assert_eq!(a.dtype(), DType::F64);
    assert!(rel_err(&a, &want)? < TOL);
    Ok(())
}

/// Bad shapes are reported as errors naming the shape, not panics.
#[test]
fn rejects_bad_shapes() -> Result<()> {
    let x = Tensor::zeros((2, 6, 4, 4), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones(6, DType::F32, &Device::Cpu)?;
    let err = group_norm(&x, &w, &w, 4, 1e-5, false).unwrap_err().to_string();
    assert!(err.contains("[2, 6, 4, 4]"), "{err}");
    let w5 = Tensor::ones(5, DType::F32, &Device::Cpu)?;
    let err = group_norm(&x, &w5, &w, 3, 1e-5, false).unwrap_err().to_string();
    assert!(err.contains("[5]"), "{err}");
    let x2 = Tensor::zeros((2, 6), DType::F32, &Device::Cpu)?;
    let err = group_norm(&x2, &w, &w, 3, 1e-5, false).unwrap_err().to_string();
    assert!(err.contains("[2, 6]"), "{err}");
    assert!(group_norm(&x, &w, &w, 0, 1e-5, false).is_err());
    Ok(())
}

/// Large affine weights push the pre-activations far into both tails of SiLU (up to
/// hundreds), where it and its gradient must saturate like candle's without overflow.
#[test]
fn silu_saturates() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for scale in [10.0, 40.0, 500.0] {
        let mut p = problem(&mut rng, &[2, 4, 6, 5], 2, true)?;
        p.w = (rand_tensor(&mut rng, &[4], -1.0, 1.0)? * scale)?;
        check(&p, &format!("weights scaled by {scale}"))?;
    }
    Ok(())
}

/// Layer norm over the last dimension matches candle-nn's differentiable `layer_norm_slow`,
/// forward and all three gradients, over row counts and widths that are not multiples of
/// the backward's task size, and on a transposed input.
#[test]
fn layer_norm_matches_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(29);
    for (i, dims) in [&[3, 5][..], &[2, 7, 33], &[4, 50, 16], &[1, 130, 9], &[65, 128]].iter().enumerate() {
        let d = *dims.last().expect("non-empty dims");
        let p = Problem {
            x: ((rand_tensor(&mut rng, dims, -2.0, 2.0)? * 3.0)? + 1.0)?,
            w: rand_tensor(&mut rng, &[d], -1.5, 1.5)?,
            b: rand_tensor(&mut rng, &[d], -1.0, 1.0)?,
            r: rand_tensor(&mut rng, dims, -1.0, 1.0)?,
            groups: 1,
            eps: 1e-5,
            silu: false,
        };
        let ours = |x: &Tensor, w: &Tensor, b: &Tensor| layer_norm(x, w, b, p.eps);
        let slow = |x: &Tensor, w: &Tensor, b: &Tensor| {
            candle_nn::ops::layer_norm_slow(x, w, b, p.eps as f32)
        };
        let got = run(&ours, &p)?;
        let want = run(&slow, &p)?;
        for (name, (g, w)) in ["out", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
            let e = rel_err(g, w)?;
            assert!(e < TOL, "case {i} {dims:?}: {name} rel err {e:e}");
        }
    }
    let x = rand_tensor(&mut rng, &[3, 8, 6], -1.0, 1.0)?;
    let (w, b) = (rand_tensor(&mut rng, &[8], -1.0, 1.0)?, rand_tensor(&mut rng, &[8], -1.0, 1.0)?);
    let xt = x.transpose(1, 2)?;
    let a = layer_norm(&xt, &w, &b, 1e-5)?;
    let want = candle_nn::ops::layer_norm_slow(&xt.contiguous()?, &w, &b, 1e-5)?;
    assert!(rel_err(&a, &want)? < TOL);
    let err = layer_norm(&x, &b.narrow(0, 0, 5)?, &b, 1e-5).unwrap_err().to_string();
    assert!(err.contains("[5]"), "{err}");
    Ok(())
}
