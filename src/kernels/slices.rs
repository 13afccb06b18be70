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
