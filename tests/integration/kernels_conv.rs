//! Correctness of `ddpo::kernels::conv2d` against candle's own conv2d: forward values, both
//! gradients through autograd, finite differences, and non-contiguous inputs.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use ddpo::kernels::conv2d;
use common::rel_err;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f32 = 1e-4;

/// Entries uniform in [-1, 1).
fn rand_tensor(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    common::rand_tensor(rng, dims, -1.0, 1.0)
}



/// Output and gradients (x, w) of `loss = sum(conv(x, w) * r)`.
fn run(
    conv: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    r: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let xv = Var::from_tensor(x)?;
    let wv = Var::from_tensor(w)?;
    let out = conv(xv.as_tensor(), wv.as_tensor())?;
    let loss = match r {
        Some(r) => (&out * r)?.sum_all()?,
        None => out.sum_all()?,
    };
    let grads = loss.backward()?;
    let gx = grads.get(xv.as_tensor()).expect("no grad for x").clone();
    let gw = grads.get(wv.as_tensor()).expect("no grad for w").clone();
    Ok((out, gx, gw))
}

#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    c: usize,
    o: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

/// Direct-loop convolution in f64 with its hand-derived gradients, independent of candle:
/// returns (out, d sum(out * r) / dx, d sum(out * r) / dw) as flat vectors.
fn naive_conv(x: &Tensor, w: &Tensor, r: &Tensor, case: Case) -> Result<[Vec<f64>; 3]> {
    let to64 = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let (xs, ws, rs) = (to64(x)?, to64(w)?, to64(r)?);
    let Case {
        n,
        c,
        o,
        h,
        w: wd,
        k,
        stride,
        pad,
    } = case;
    let (ho, wo) = (r.dim(2)?, r.dim(3)?);
    let mut out = vec![0f64; n * o * ho * wo];
    let mut gx = vec![0f64; xs.len()];
    let mut gw = vec![0f64; ws.len()];
    for (b, oc, oy, ox, ci, ki, kj) in conv_indices(n, o, ho, wo, c, k) {
        let iy = (oy * stride + ki) as isize - pad as isize;
        let ix = (ox * stride + kj) as isize - pad as isize;
        if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
            continue;
        }
        let xi = ((b * c + ci) * h + iy as usize) * wd + ix as usize;
        let wi = ((oc * c + ci) * k + ki) * k + kj;
        let oi = ((b * o + oc) * ho + oy) * wo + ox;
        out[oi] += xs[xi] * ws[wi];
        gx[xi] += rs[oi] * ws[wi];
        gw[wi] += rs[oi] * xs[xi];
    }
    Ok([out, gx, gw])
}

/// All index tuples (batch, out channel, oy, ox, in channel, ki, kj) of a convolution.
fn conv_indices(
    n: usize,
    o: usize,
    ho: usize,
    wo: usize,
    c: usize,
    k: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize, usize, usize, usize)> {
    (0..n).flat_map(move |b| {
        (0..o).flat_map(move |oc| {
            (0..ho).flat_map(move |oy| {
                (0..wo).flat_map(move |ox| {
                    (0..c).flat_map(move |ci| {
                        (0..k).flat_map(move |ki| (0..k).map(move |kj| (b, oc, oy, ox, ci, ki, kj)))
                    })
                })
            })
        })
    })
}

fn rel_err_f64(a: &Tensor, b: &[f64]) -> Result<f32> {
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    assert_eq!(a.len(), b.len(), "size mismatch");
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    Ok((diff / scale) as f32)
}

/// candle's conv2d backward derives the input-gradient output padding from the height alone,
/// so it fails when height and width leave different remainders modulo the stride.
fn candle_backward_works(case: Case) -> bool {
    let rem = |len: usize| (len + 2 * case.pad - case.k) % case.stride;
    rem(case.h) == rem(case.w)
}

fn check_case(rng: &mut ChaCha8Rng, case: Case) -> Result<()> {
    let x = rand_tensor(rng, &[case.n, case.c, case.h, case.w])?;
    let w = rand_tensor(rng, &[case.o, case.c, case.k, case.k])?;
    let ours = |x: &Tensor, w: &Tensor| conv2d(x, w, None, case.stride, case.pad);
    let reference = |x: &Tensor, w: &Tensor| x.conv2d(w, case.pad, case.stride, 1, 1);
    let out_ref = reference(&x, &w)?;
    let r = rand_tensor(rng, out_ref.dims())?;
    let (out, gx, gw) = run(ours, &x, &w, Some(&r))?;

    // Against candle: forward always, gradients wherever candle's own backward is sound.
    let e_out = rel_err(&out, &out_ref)?;
    assert!(e_out < TOL, "{case:?}: forward rel err vs candle {e_out}");
    if candle_backward_works(case) {
        let (_, gx_ref, gw_ref) = run(reference, &x, &w, Some(&r))?;
        let (e_gx, e_gw) = (rel_err(&gx, &gx_ref)?, rel_err(&gw, &gw_ref)?);
        assert!(
            e_gx < TOL && e_gw < TOL,
            "{case:?}: grad rel err vs candle x {e_gx}, w {e_gw}"
        );
    }

    // Against the independent f64 direct loop: everything, always.
    let [out64, gx64, gw64] = naive_conv(&x, &w, &r, case)?;
    let errs = [
        rel_err_f64(&out, &out64)?,
        rel_err_f64(&gx, &gx64)?,
        rel_err_f64(&gw, &gw64)?,
    ];
    assert!(
        errs.iter().all(|e| *e < TOL),
        "{case:?}: rel err vs direct loop (out, gx, gw) {errs:?}"
    );
    Ok(())
}

/// Randomised shapes (seeded) over batch, channels, odd and even sizes, k, stride, padding.
#[test]
fn matches_candle_on_random_shapes() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(0xC0DE);
    for _ in 0..60 {
        let case = Case {
            n: rng.random_range(1..=4),
            c: rng.random_range(1..=8),
            o: rng.random_range(1..=8),
            h: rng.random_range(5..=12),
            w: rng.random_range(5..=12),
            k: if rng.random_bool(0.5) { 1 } else { 3 },
            stride: rng.random_range(1..=2),
            pad: rng.random_range(0..=1),
        };
        check_case(&mut rng, case)?;
    }
    Ok(())
}

/// Every (k, stride, pad) combination at least once, on an odd-sized image.
#[test]
fn matches_candle_on_every_kernel_stride_padding() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for k in [1, 3] {
        for stride in [1, 2] {
            for pad in [0, 1] {
                let case = Case {
                    n: 2,
                    c: 3,
                    o: 4,
                    h: 7,
                    w: 9,
                    k,
                    stride,
                    pad,
                };
                check_case(&mut rng, case)?;
            }
        }
    }
    Ok(())
}

/// Kernels other than 1 and 3 and padding wider than one still work (general geometry).
#[test]
fn matches_candle_on_other_kernels() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (k, stride, pad) in [(5, 1, 2), (4, 2, 1), (2, 3, 0), (3, 3, 2)] {
        let case = Case {
            n: 2,
            c: 3,
            o: 2,
            h: 11,
            w: 8,
            k,
            stride,
            pad,
        };
        check_case(&mut rng, case)?;
    }
    Ok(())
}

/// The typical UNet shape at a small batch, with loss = sum(out).
#[test]
fn matches_candle_on_unet_like_shape() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = rand_tensor(&mut rng, &[2, 16, 16, 16])?;
    let w = rand_tensor(&mut rng, &[8, 16, 3, 3])?;
    let (out, gx, gw) = run(|x, w| conv2d(x, w, None, 1, 1), &x, &w, None)?;
    let (out_r, gx_r, gw_r) = run(|x, w| x.conv2d(w, 1, 1, 1, 1), &x, &w, None)?;
    assert!(rel_err(&out, &out_r)? < TOL);
    assert!(rel_err(&gx, &gx_r)? < TOL);
    assert!(rel_err(&gw, &gw_r)? < TOL);
    Ok(())
}

/// A batch that the stride-1 path splits into uneven cache-sized groups of items (2+2+2+2+1
/// here, spread over the threads) and the strided im2col path works through in several column chunks (7 + 2: the
/// same output size, 32x32, as the stride-1 case).
#[test]
fn matches_candle_across_forward_batch_chunks() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for stride in [1, 2] {
        let case = Case {
            n: 9,
            c: 16,
            o: 8,
            h: 32 * stride,
            w: 32 * stride,
            k: 3,
            stride,
            pad: 1,
        };
        check_case(&mut rng, case)?;
    }
    Ok(())
}

/// Central finite differences of loss = sum(conv(x, w) * r) on a tiny f64-accurate-enough case.
#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for (stride, pad) in [(1, 1), (2, 0)] {
        let x = rand_tensor(&mut rng, &[1, 2, 5, 6])?;
        let w = rand_tensor(&mut rng, &[2, 2, 3, 3])?;
        let r = rand_tensor(&mut rng, conv2d(&x, &w, None, stride, pad)?.dims())?;
        let loss = |x: &Tensor, w: &Tensor| -> Result<f64> {
            let l = (conv2d(x, w, None, stride, pad)? * &r)?.sum_all()?;
            l.to_dtype(DType::F64)?.to_scalar::<f64>()
        };
        let (_, gx, gw) = run(|x, w| conv2d(x, w, None, stride, pad), &x, &w, Some(&r))?;
        check_fd(&x, &gx, |xp| loss(xp, &w))?;
        check_fd(&w, &gw, |wp| loss(&x, wp))?;
    }
    Ok(())
}

/// Compares every entry of `grad` with (f(t + eps e_i) - f(t - eps e_i)) / (2 eps).
fn check_fd(t: &Tensor, grad: &Tensor, f: impl Fn(&Tensor) -> Result<f64>) -> Result<()> {
    let eps = 1e-2f32;
    let base: Vec<f32> = t.flatten_all()?.to_vec1()?;
    let grad: Vec<f32> = grad.flatten_all()?.to_vec1()?;
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let fp = f(&Tensor::from_vec(plus, t.dims(), &Device::Cpu)?)?;
        let fm = f(&Tensor::from_vec(minus, t.dims(), &Device::Cpu)?)?;
        let fd = ((fp - fm) / (2.0 * eps as f64)) as f32;
        // The loss is linear in each argument, so only f32 rounding separates the two.
        assert!(
            (fd - grad[i]).abs() < 2e-3 * (1.0 + fd.abs()),
            "entry {i}: finite difference {fd} vs autograd {}",
            grad[i]
        );
    }
    Ok(())
}

/// Transposed and narrowed (non-contiguous) inputs and weights give the same results.
#[test]
fn handles_non_contiguous_inputs() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // x stored as (N, C, W, H) and transposed: non-contiguous (N, C, H, W).
    let x_t = rand_tensor(&mut rng, &[2, 3, 9, 7])?.transpose(2, 3)?;
    // x narrowed along the channels of a wider tensor.
    let x_n = rand_tensor(&mut rng, &[2, 6, 7, 9])?.narrow(1, 2, 3)?;
    // Weight stored as (C, O, kh, kw) and transposed.
    let w_t = rand_tensor(&mut rng, &[3, 4, 3, 3])?.transpose(0, 1)?;
    assert!(!x_t.is_contiguous() && !x_n.is_contiguous() && !w_t.is_contiguous());
    for x in [&x_t, &x_n] {
        for (stride, pad) in [(1, 1), (2, 1), (1, 0)] {
            let ours = |x: &Tensor, w: &Tensor| conv2d(x, w, None, stride, pad);
            let reference = |x: &Tensor, w: &Tensor| {
                x.contiguous()?.conv2d(&w.contiguous()?, pad, stride, 1, 1)
            };
            let (out, gx, gw) = run(ours, x, &w_t, None)?;
            let (out_r, gx_r, gw_r) = run(reference, x, &w_t, None)?;
            assert!(rel_err(&out, &out_r)? < TOL);
            assert!(rel_err(&gx, &gx_r)? < TOL);
            assert!(rel_err(&gw, &gw_r)? < TOL);
        }
    }
    // 1x1 path with a non-contiguous input.
    let w1 = rand_tensor(&mut rng, &[5, 3, 1, 1])?;
    let (out, gx, gw) = run(|x, w| conv2d(x, w, None, 1, 0), &x_t, &w1, None)?;
    let (out_r, gx_r, gw_r) = run(
        |x, w| x.contiguous()?.conv2d(w, 0, 1, 1, 1),
        &x_t,
        &w1,
        None,
    )?;
    assert!(rel_err(&out, &out_r)? < TOL);
    assert!(rel_err(&gx, &gx_r)? < TOL);
    assert!(rel_err(&gw, &gw_r)? < TOL);
    Ok(())
}

/// Im2Col and Col2Im are adjoint: <im2col(x), c> == <x, col2im(c)>, and double backward
/// through the input gradient works.
#[test]
fn col2im_is_adjoint_of_im2col() -> Result<()> {
    use ddpo::kernels::im2col::{Col2Im, ConvGeom, Im2Col};
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (k, stride, pad) in [(3, 2, 1), (3, 1, 1), (1, 2, 0), (2, 1, 0)] {
        let g = ConvGeom::new((2, 3, 7, 6), (k, k), stride, pad)?;
        let x = rand_tensor(&mut rng, &[2, 3, 7, 6])?;
        let c = rand_tensor(&mut rng, &[2, g.k(), g.p()])?;
        let lhs = (x.apply_op1(Im2Col(g))? * &c)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let rhs = (&x * c.apply_op1(Col2Im(g))?)?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(
            (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
            "{g:?}: {lhs} vs {rhs}"
        );

        // Col2Im's backward is Im2Col: d/dc sum(col2im(c) * x) == im2col(x).
        let cv = Var::from_tensor(&c)?;
        let grads = (cv.as_tensor().apply_op1(Col2Im(g))? * &x)?
            .sum_all()?
            .backward()?;
        let gc = grads.get(cv.as_tensor()).expect("no grad for cols");
        assert!(rel_err(gc, &x.apply_op1(Im2Col(g))?)? < TOL);
    }
    Ok(())
}

/// Bad shapes are reported as errors naming the shape, not panics.
#[test]
fn rejects_bad_shapes() -> Result<()> {
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu)?;
    let w_bad_c = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu)?;
    let err = conv2d(&x, &w_bad_c, None, 1, 1).unwrap_err().to_string();
    assert!(err.contains("channels"), "{err}");
    let w_big = Tensor::zeros((2, 3, 7, 7), DType::F32, &Device::Cpu)?;
    let err = conv2d(&x, &w_big, None, 1, 0).unwrap_err().to_string();
    assert!(err.contains("larger than padded input"), "{err}");
    let x3 = Tensor::zeros((3, 4, 4), DType::F32, &Device::Cpu)?;
    let err = conv2d(&x3, &w_bad_c, None, 1, 1).unwrap_err().to_string();
    assert!(err.contains("[3, 4, 4]"), "{err}");
    let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &Device::Cpu)?;
    assert!(conv2d(&x, &w, None, 0, 1).is_err());
    Ok(())
}

/// Zero input channels: the output is all zeros (a sum over nothing) and both gradients exist.
#[test]
fn zero_input_channels_give_zeros() -> Result<()> {
    let x = Tensor::zeros((2, 0, 5, 5), DType::F32, &Device::Cpu)?;
    let w = Tensor::zeros((3, 0, 3, 3), DType::F32, &Device::Cpu)?;
    let r = Tensor::ones((2, 3, 5, 5), DType::F32, &Device::Cpu)?;
    let (out, gx, gw) = run(|x, w| conv2d(x, w, None, 1, 1), &x, &w, Some(&r))?;
    assert_eq!(out.dims(), &[2, 3, 5, 5]);
    assert_eq!(out.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!((gx.dims(), gw.dims()), (x.dims(), w.dims()));
    Ok(())
}

/// Non-f32 inputs fall back to candle and still agree.
#[test]
fn f64_falls_back_to_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let x = rand_tensor(&mut rng, &[1, 2, 6, 6])?.to_dtype(DType::F64)?;
    let w = rand_tensor(&mut rng, &[3, 2, 3, 3])?.to_dtype(DType::F64)?;
    let a = conv2d(&x, &w, None, 1, 1)?;
    let b = x.conv2d(&w, 1, 1, 1, 1)?;
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    assert!(d < 1e-12);
    Ok(())
}

/// Output and gradients (x, w, b) of `loss = sum(conv(x, w, b) * r)`.
fn run_bias(
    conv: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
) -> Result<[Tensor; 4]> {
    let (xv, wv, bv) = (Var::from_tensor(x)?, Var::from_tensor(w)?, Var::from_tensor(b)?);
    let out = conv(xv.as_tensor(), wv.as_tensor(), bv.as_tensor())?;
    let grads = (&out * r)?.sum_all()?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("missing gradient").clone();
    Ok([out, grad(&xv), grad(&wv), grad(&bv)])
}

/// A per-channel (O,) or per-sample (N, O) bias matches candle's conv plus broadcast add,
/// forward and all three gradients, over 3x3, strided and 1x1 geometries.
#[test]
fn bias_matches_candle() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for (i, &(n, c, o, h, k, stride, pad)) in [
        (2, 3, 5, 7, 3, 1, 1),
        (3, 4, 2, 9, 3, 2, 1),
        (1, 6, 4, 5, 1, 1, 0),
        (4, 2, 3, 6, 3, 1, 0),
    ]
    .iter()
    .enumerate()
    {
        for per_sample in [false, true] {
            let x = rand_tensor(&mut rng, &[n, c, h, h])?;
            let w = rand_tensor(&mut rng, &[o, c, k, k])?;
            let b_dims: &[usize] = if per_sample { &[n, o] } else { &[o] };
            let b = rand_tensor(&mut rng, b_dims)?;
            let r = rand_tensor(&mut rng, conv2d(&x, &w, None, stride, pad)?.dims())?;
            let ours = |x: &Tensor, w: &Tensor, b: &Tensor| conv2d(x, w, Some(b), stride, pad);
            let reference = |x: &Tensor, w: &Tensor, b: &Tensor| {
                let b4 = b.reshape((if per_sample { n } else { 1 }, o, 1, 1))?;
                x.conv2d(w, pad, stride, 1, 1)?.broadcast_add(&b4)
            };
            let got = run_bias(ours, &x, &w, &b, &r)?;
            let want = run_bias(reference, &x, &w, &b, &r)?;
            for (name, (g, wt)) in ["out", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
                let e = rel_err(g, wt)?;
                assert!(e < TOL, "case {i}, per_sample {per_sample}: {name} rel err {e:e}");
            }
        }
    }
    Ok(())
}

/// The bias gradient agrees with central differences of the loss along a random direction.
#[test]
fn bias_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let x = rand_tensor(&mut rng, &[2, 3, 5, 5])?;
    let w = rand_tensor(&mut rng, &[4, 3, 3, 3])?;
    for b_dims in [&[4][..], &[2, 4][..]] {
        let b = rand_tensor(&mut rng, b_dims)?;
        let r = rand_tensor(&mut rng, &[2, 4, 5, 5])?;
        let [_, _, _, gb] = run_bias(|x, w, b| conv2d(x, w, Some(b), 1, 1), &x, &w, &b, &r)?;
        let loss = |b: &Tensor| -> Result<f64> {
            let y = conv2d(&x, &w, Some(b), 1, 1)?.to_dtype(DType::F64)?;
            (y * r.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()
        };
        let v = rand_tensor(&mut rng, b_dims)?;
        let eps = 1e-2;
        let numeric = (loss(&(&b + (&v * eps)?)?)? - loss(&(&b - (&v * eps)?)?)?) / (2.0 * eps);
        let analytic = (&gb * &v)?.sum_all()?.to_scalar::<f32>()? as f64;
        let err = (numeric - analytic).abs() / analytic.abs().max(1.0);
        assert!(err < 1e-3, "bias {b_dims:?}: fd {numeric} vs grad {analytic}");
    }
    Ok(())
}

/// A bias of the wrong shape is an error naming the shapes.
#[test]
fn rejects_bad_bias() -> Result<()> {
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu)?;
    let w = Tensor::zeros((5, 3, 3, 3), DType::F32, &Device::Cpu)?;
    for dims in [&[4][..], &[3, 5][..], &[2, 5, 1][..]] {
        let b = Tensor::zeros(dims, DType::F32, &Device::Cpu)?;
        let err = conv2d(&x, &w, Some(&b), 1, 1).unwrap_err().to_string();
        assert!(err.contains(&format!("{dims:?}")), "{err}");
    }
    Ok(())
}
