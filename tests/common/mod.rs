//! Helpers shared by the tests: seeded random tensors and a scale-relative error (kernels), the
//! tiny policy fixtures ([`fixtures`]) and a test-double model family ([`gaussian`]).
#![allow(dead_code)]

pub mod fixtures;
pub mod gaussian;


use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A tensor of `dims` with entries uniform in [lo, hi).
pub fn rand_tensor(rng: &mut ChaCha8Rng, dims: &[usize], lo: f32, hi: f32) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// Max |a - b| / max(1, max |b|): relative to the reference's scale, robust to zeros.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
    Ok(diff / scale)
}
