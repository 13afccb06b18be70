//! Plain-slice helpers shared by the custom ops: borrowing a tensor's f32 data without a
//! copy, and float reductions written so that the compiler vectorises them.

use candle_core::{bail, CpuStorage, Result, Storage, Tensor};

/// Calls `f` with the row-major f32 data of a CPU tensor, borrowed in place when the tensor is
/// contiguous (backward passes otherwise pay a full copy of every activation they read).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let data = match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => data.as_slice(),
        _ => bail!("{op}: expected an f32 CPU tensor, got {:?} on {:?}", t.dtype(), t.device()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(f(&data[start..end])),
        None => bail!("{op}: tensor of shape {:?} is not contiguous", t.dims()),
    }
}

/// Lanes of independent partial sums: lets the compiler vectorise float reductions (which it
/// may not reorder itself) and keeps rounding error growth low.
const LANES: usize = 16;

/// Σ x.
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Σ (x - m)².
pub(crate) fn sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v - m) * (v - m);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&v| (v - m) * (v - m)).sum();
    acc.iter().sum::<f32>() + rest
}

/// Σ a·b.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += u * v;
        }
    }
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(u, v)| u * v).sum();
    acc.iter().sum::<f32>() + rest
}

/// Sums the rows of a row-major (rows, c) buffer into (c,), accumulating in f64.
pub(crate) fn sum_rows(parts: &[f32], c: usize) -> Vec<f32> {
    let mut acc = vec![0f64; c];
    for row in parts.chunks_exact(c.max(1)) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// e^x to about 2 ulp, branch-free so that loops calling it vectorise (libm's `expf` is a
/// scalar call per element, and dominated the fused GroupNorm+SiLU).
///
/// Cody-Waite range reduction x = k ln2 + f, |f| <= ln2/2, Cephes' degree-6 polynomial for
/// e^f, and 2^k built in the exponent bits. Inputs are clamped to [-87, 88], where 2^k stays
/// a normal float; beyond them e^x is below 1.7e-38 or above 1.6e38.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let r = x * LOG2E + ROUND;
    let k = r - ROUND;
    let ki = (r.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let f = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * f + 1.398_199_9e-3;
    p = p * f + 8.333_452e-3;
    p = p * f + 4.166_579_6e-2;
    p = p * f + 1.666_666_5e-1;
    p = p * f + 5.000_000_1e-1;
    let y = p * f * f + f + 1.0;
    y * f32::from_bits(((ki + 127) << 23) as u32)
}
