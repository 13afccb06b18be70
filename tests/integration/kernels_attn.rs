//! Correctness of the attention kernels against the composed candle paths they replace:
//! `ddpo::kernels::softmax_last_dim` (scale, optional additive mask, softmax) against
//! `x * s + mask` then candle-nn's `softmax`, and `ddpo::kernels::geglu` against `chunk`,
//! `gelu_erf`, multiply. Forward values and gradients over random shapes, `-inf` (causal)
//! masks, mask gradients, finite differences on tiny cases, f64 fallbacks, the GELU's accuracy
//! against f64 erf, shape errors, and `layers::attention` end to end.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use ddpo::kernels::{geglu, softmax_last_dim};
use common::{rand_tensor, rel_err};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FWD_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-4;



/// An (L, L) additive mask: 0 on and below the diagonal, -inf above, as the text encoder's.
fn causal_mask(len: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (len, len), &Device::Cpu)
}

type Op<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// Output and input gradient of `loss = sum(op(x) * r)`.
fn run(op: Op, x: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
    let xv = Var::from_tensor(x)?;
    let out = op(xv.as_tensor())?;
    let grads = (&out * r)?.sum_all()?.backward()?;
    let g = grads.get(xv.as_tensor()).expect("missing gradient").clone();
    Ok((out, g))
}

/// Asserts that `ours` and `reference` agree on output and gradient for `x`.
fn check(ours: Op, reference: Op, x: &Tensor, rng: &mut ChaCha8Rng, what: &str) -> Result<()> {
    let out_dims = reference(x)?.dims().to_vec();
    let r = rand_tensor(rng, &out_dims, -1.0, 1.0)?;
    let (y, g) = run(ours, x, &r)?;
    let (y_ref, g_ref) = run(reference, x, &r)?;
    let e = rel_err(&y, &y_ref)?;
    assert!(e < FWD_TOL, "{what}: forward rel err {e:e}");
    let e = rel_err(&g, &g_ref)?;
    assert!(e < GRAD_TOL, "{what}: gradient rel err {e:e}");
    Ok(())
}

/// The composed softmax the fused op replaces.
fn softmax_ref(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let z = (x * scale)?;
    let z = match mask {
        Some(m) => z.broadcast_add(m)?,
        None => z,
    };
    candle_nn::ops::softmax(&z, D::Minus1)
}

/// The composed GEGLU the fused op replaces.
fn geglu_ref(h: &Tensor) -> Result<Tensor> {
    let chunks = h.chunk(2, D::Minus1)?;
    &chunks[0] * chunks[1].gelu_erf()?
}

/// Random (batch·heads, Lq, Lk) scores, scales and lengths 1 to 80, with and without a mask.
#[test]
fn softmax_matches_candle_over_random_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for case in 0..40 {
        let dims = [rng.random_range(1..=6), rng.random_range(1..=20), rng.random_range(1..=80)];
        let spread = rng.random_range(0.5f32..20.0);
        let x = rand_tensor(&mut rng, &dims, -spread, spread)?;
        let scale = rng.random_range(0.05f64..2.0);
        let mask = if case % 2 == 0 { Some(rand_tensor(&mut rng, &dims[1..], -3.0, 3.0)?) } else { None };
        let what = format!("case {case}: dims {dims:?}, scale {scale}, mask {}", mask.is_some());
        let ours = |x: &Tensor| softmax_last_dim(x, scale, mask.as_ref());
        let reference = |x: &Tensor| softmax_ref(x, scale, mask.as_ref());
        check(&ours, &reference, &x, &mut rng, &what)?;
    }
    Ok(())
}

/// A causal `-inf` mask over (B, H, L, L) scores (the text encoder's shapes): the masked
/// probabilities are exactly 0, and everything matches the composed path.
#[test]
fn softmax_with_causal_mask() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for len in [1, 5, 16, 77] {
        let dims = [2, 3, len, len];
        let x = rand_tensor(&mut rng, &dims, -4.0, 4.0)?;
        let mask = causal_mask(len)?;
        let ours = |x: &Tensor| softmax_last_dim(x, 0.125, Some(&mask));
        let reference = |x: &Tensor| softmax_ref(x, 0.125, Some(&mask));
        check(&ours, &reference, &x, &mut rng, &format!("causal, len {len}"))?;
        let y = ours(&x)?.flatten_to(2)?.to_vec2::<f32>()?;
        for (r, row) in y.iter().enumerate() {
            let i = r % len;
            assert!(row[i + 1..].iter().all(|&p| p == 0.0), "len {len}, row {r}: masked entries not 0");
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "len {len}, row {r}: sums to {total}");
        }
    }
    Ok(())
}

/// Masks that do not match the last two dims (broadcast over heads, or a full-size mask) take
/// the unfused path and still match.
#[test]
fn softmax_with_broadcast_masks() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = rand_tensor(&mut rng, &[2, 3, 4, 5], -2.0, 2.0)?;
    for mask_dims in [vec![2, 1, 4, 5], vec![5], vec![2, 3, 4, 5]] {
        let mask = rand_tensor(&mut rng, &mask_dims, -1.0, 1.0)?;
        let ours = |x: &Tensor| softmax_last_dim(x, 0.5, Some(&mask));
        let reference = |x: &Tensor| softmax_ref(x, 0.5, Some(&mask));
        check(&ours, &reference, &x, &mut rng, &format!("mask {mask_dims:?}"))?;
    }
    Ok(())
}

/// A mask that is a variable gets the same gradient as in the composed path.
#[test]
fn softmax_mask_gradient() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = rand_tensor(&mut rng, &[3, 2, 6, 7], -2.0, 2.0)?;
    let m = Var::from_tensor(&rand_tensor(&mut rng, &[6, 7], -1.0, 1.0)?)?;
    let r = rand_tensor(&mut rng, x.dims(), -1.0, 1.0)?;
    let grad = |y: Tensor| -> Result<Tensor> {
        let grads = (y * &r)?.sum_all()?.backward()?;
        Ok(grads.get(m.as_tensor()).expect("missing mask gradient").clone())
    };
    let ours = grad(softmax_last_dim(&x, 0.3, Some(m.as_tensor()))?)?;
    let want = grad(softmax_ref(&x, 0.3, Some(m.as_tensor()))?)?;
    let e = rel_err(&ours, &want)?;
    assert!(e < GRAD_TOL, "mask gradient rel err {e:e}");
    Ok(())
}

/// Central differences (in f64 loss) along random directions agree with the op's gradient.
fn finite_differences(op: Op, x: &Tensor, rng: &mut ChaCha8Rng, what: &str) -> Result<()> {
    let r = rand_tensor(rng, op(x)?.dims(), -1.0, 1.0)?;
    let (_, g) = run(op, x, &r)?;
    let loss = |x: &Tensor| -> Result<f64> {
        (op(x)?.to_dtype(DType::F64)? * r.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()
    };
    let eps = 1e-2;
    for trial in 0..4 {
        let dir = rand_tensor(rng, x.dims(), -1.0, 1.0)?;
        let fd = (loss(&(x + (&dir * eps)?)?)? - loss(&(x - (&dir * eps)?)?)?) / (2.0 * eps);
        let an = (&g * &dir)?.sum_all()?.to_scalar::<f32>()? as f64;
        let err = (fd - an).abs() / an.abs().max(1.0);
        assert!(err < 2e-3, "{what}, trial {trial}: finite difference {fd} vs gradient {an}");
    }
    Ok(())
}

#[test]
fn softmax_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = rand_tensor(&mut rng, &[2, 3, 4], -2.0, 2.0)?;
    let mask = causal_mask(4)?.narrow(0, 0, 3)?;
    finite_differences(&|x| softmax_last_dim(x, 0.7, None), &x, &mut rng, "softmax")?;
    finite_differences(&|x| softmax_last_dim(x, 0.7, Some(&mask)), &x, &mut rng, "masked softmax")
}

/// Random (.., 2·inner) inputs, including the feed-forward's (B, L, 2·4C), with |h| up to 10
/// so that the GELU's tails are exercised.
#[test]
fn geglu_matches_candle_over_random_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for case in 0..30 {
        let inner = rng.random_range(1..=70);
        let mut dims = vec![rng.random_range(1..=4)];
        if case % 3 != 0 {
            dims.push(rng.random_range(1..=17));
        }
        dims.push(2 * inner);
        let spread = rng.random_range(0.5f32..10.0);
        let h = rand_tensor(&mut rng, &dims, -spread, spread)?;
        check(&geglu, &geglu_ref, &h, &mut rng, &format!("case {case}: dims {dims:?}"))?;
    }
    let h = rand_tensor(&mut rng, &[4, 64, 512], -3.0, 3.0)?;
    check(&geglu, &geglu_ref, &h, &mut rng, "feed-forward shape")
}

/// The f32 GELU against f64 `gelu_erf` elementwise: relative error below 2e-6, plus 1e-13
/// absolute for the far left tail (x < -5.5, |gelu| < 1e-7), where rounding -x²/2 to f32
/// costs a few 1e-6 relative and the f64 reference's own `1 + erf` cancels to ~1e-16.
#[test]
fn geglu_gelu_accuracy() -> Result<()> {
    let n = 4001;
    let g: Vec<f32> = (0..n).map(|i| -10.0 + 20.0 * i as f32 / (n - 1) as f32).collect();
    let a = vec![1f32; n];
    let h = Tensor::from_vec([a, g.clone()].concat(), (1, 2 * n), &Device::Cpu)?;
    let ours = geglu(&h)?.flatten_all()?.to_vec1::<f32>()?;
    let exact = Tensor::from_vec(g.clone(), n, &Device::Cpu)?.to_dtype(DType::F64)?.gelu_erf()?;
    for ((&x, &y), e) in g.iter().zip(&ours).zip(exact.to_vec1::<f64>()?) {
        let err = (y as f64 - e).abs();
        assert!(err < 2e-6 * e.abs() + 1e-13, "gelu({x}) = {y}, exact {e}: err {err:e}");
    }
    Ok(())
}

#[test]
fn geglu_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let h = rand_tensor(&mut rng, &[2, 3, 8], -3.0, 3.0)?;
    finite_differences(&geglu, &h, &mut rng, "geglu")
}

/// f64 and non-contiguous inputs take the composed path or a contiguous copy and still match.
#[test]
fn fallbacks_and_layouts() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = rand_tensor(&mut rng, &[3, 4, 6], -2.0, 2.0)?;
    let x64 = x.to_dtype(DType::F64)?;
    let e = rel_err(&softmax_last_dim(&x64, 0.5, None)?, &softmax_ref(&x64, 0.5, None)?)?;
    assert!(e < FWD_TOL, "f64 softmax rel err {e:e}");
    let e = rel_err(&geglu(&x64)?, &geglu_ref(&x64)?)?;
    assert!(e < FWD_TOL, "f64 geglu rel err {e:e}");
    let softmax_t = |x: &Tensor| softmax_last_dim(&x.transpose(1, 2)?, 0.5, None);
    let softmax_t_ref = |x: &Tensor| softmax_ref(&x.transpose(1, 2)?, 0.5, None);
    check(&softmax_t, &softmax_t_ref, &x, &mut rng, "transposed softmax")?;
    let geglu_t = |x: &Tensor| geglu(&x.transpose(1, 2)?);
    let geglu_t_ref = |x: &Tensor| geglu_ref(&x.transpose(1, 2)?);
    check(&geglu_t, &geglu_t_ref, &x, &mut rng, "transposed geglu")
}

/// Bad shapes are errors that name the shape, not panics.
#[test]
fn shape_errors() -> Result<()> {
    let odd = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
    let err = geglu(&odd).expect_err("odd width must fail").to_string();
    assert!(err.contains("[2, 5]"), "{err}");
    let scalar = Tensor::new(1f32, &Device::Cpu)?;
    assert!(softmax_last_dim(&scalar, 1.0, None).is_err());
    let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu)?;
    let bad_mask = Tensor::zeros((5, 4), DType::F32, &Device::Cpu)?;
    let err = softmax_last_dim(&x, 1.0, Some(&bad_mask)).expect_err("bad mask must fail").to_string();
    assert!(err.contains("[5, 4]"), "{err}");
    Ok(())
}

/// `layers::attention` (fused softmax) against the same attention written with candle ops,
/// with and without a causal mask: output and gradients of q, k, v.
#[test]
fn attention_matches_composed() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (b, l, heads, d) = (3, 9, 4, 8);
    let reference = |q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>| -> Result<Tensor> {
        let split = |t: &Tensor| t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let p = softmax_ref(&q.matmul(&k.t()?)?, 1.0 / (d as f64).sqrt(), mask)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((b, l, heads * d))
    };
    let mask = causal_mask(l)?;
    for m in [None, Some(&mask)] {
        let qkv: Vec<Var> = (0..3)
            .map(|_| Var::from_tensor(&rand_tensor(&mut rng, &[b, l, heads * d], -2.0, 2.0)?))
            .collect::<Result<_>>()?;
        let r = rand_tensor(&mut rng, &[b, l, heads * d], -1.0, 1.0)?;
        let grads = |y: Tensor| -> Result<Vec<Tensor>> {
            let gs = (&y * &r)?.sum_all()?.backward()?;
            let mut out = vec![y];
            out.extend(qkv.iter().map(|v| gs.get(v.as_tensor()).expect("missing gradient").clone()));
            Ok(out)
        };
        let (q, k, v) = (qkv[0].as_tensor(), qkv[1].as_tensor(), qkv[2].as_tensor());
        let ours = grads(ddpo::model::layers::attention(q, k, v, heads, m)?)?;
        let want = grads(reference(q, k, v, m)?)?;
        for (name, (g, w)) in ["out", "dq", "dk", "dv"].iter().zip(ours.iter().zip(&want)) {
            let e = rel_err(g, w)?;
            assert!(e < GRAD_TOL, "mask {}: {name} rel err {e:e}", m.is_some());
        }
    }
    Ok(())
}
