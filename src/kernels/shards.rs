//! Data parallelism across CPU cores: a batch split into one shard per core, the shards run
//! concurrently.
//!
//! candle runs element-wise ops on one thread (`main.rs` keeps its spinning pool out of gemm's
//! way) and only gemm on all cores, so one UNet pass leaves the other cores idle through every
//! norm, activation, copy and gradient accumulation: two runs side by side on a 2-core machine
//! each went almost as fast as one alone. Shards that each run the whole model on part of the
//! batch fill those gaps. Results match the unsharded batch to floating-point rounding.

use std::cell::Cell;
use std::ops::Range;
use std::sync::OnceLock;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

thread_local! {
    /// Set inside a shard, so that nested calls (a sharded loss calling a sharded forward) run
    /// their part on the shard's own thread.
    static IN_SHARD: Cell<bool> = const { Cell::new(false) };
}

/// Into how many shards to split a batch of `n` on `device`: one per core of the compute
/// pool (`RAYON_NUM_THREADS`) on the CPU, never more than `n`; 1 inside a shard or on a GPU.
/// `DDPO_SHARDS` overrides the shard count (1 turns sharding off, e.g. to compare).
pub fn shard_count(n: usize, device: &Device) -> usize {
    if !device.is_cpu() || IN_SHARD.with(Cell::get) {
        return 1;
    }
    static CONFIGURED: OnceLock<Option<usize>> = OnceLock::new();
    let configured = *CONFIGURED.get_or_init(|| std::env::var("DDPO_SHARDS").ok().and_then(|s| s.parse().ok()));
    configured.unwrap_or_else(rayon::current_num_threads).clamp(1, n.max(1))
}

/// The shard ranges of a batch of `n` on `device` (see [`shard_count`]).
pub fn split(n: usize, device: &Device) -> Vec<Range<usize>> {
    shard_ranges(n, shard_count(n, device))
}

/// `n` rows in `shards` contiguous ranges whose lengths differ by at most one.
pub fn shard_ranges(n: usize, shards: usize) -> Vec<Range<usize>> {
    let shards = shards.clamp(1, n.max(1));
    let (base, extra) = (n / shards, n % shards);
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let len = base + usize::from(i < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// Runs `f` on each of the shard `ranges` concurrently (the first on this thread) and returns
/// the results in order. The caller's forward-pass scopes ([`super::no_grad`]) are carried
/// into the shards.
pub fn map_shards<R: Send>(ranges: &[Range<usize>], f: impl Fn(Range<usize>) -> R + Sync) -> Vec<R> {
    let scopes = super::no_grad::Scopes::current();
    let run = |r: Range<usize>| -> R {
        let before = IN_SHARD.with(|s| s.replace(true));
        let out = scopes.enter(|| f(r));
        IN_SHARD.with(|s| s.set(before));
        out
    };
    let Some((first, rest)) = ranges.split_first() else { return Vec::new() };
    if !rest.is_empty() {
        super::alloc::reuse_freed_memory(); // before the shard threads pick their malloc arenas
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = rest.iter().map(|r| s.spawn(|| run(r.clone()))).collect();
        let mut out = vec![run(first.clone())];
        out.extend(handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))));
        out
    })
}

/// One shard's backward pass: its gradients, its share of the batch and what its loss
/// function returned besides the loss.
pub struct ShardGrads<T> {
    pub grads: GradStore,
    pub share: f64,
    pub extra: T,
}

/// The gradients of a batch's mean loss, one backward pass per shard, concurrently.
/// `loss(rows)` returns the mean loss over those rows of the batch (plus anything else the
/// caller wants back); each shard's loss is weighted by its share of the `n` rows, so the
/// shards' gradients sum to those of the whole batch's mean.
pub fn sharded_backward<T: Send, E: From<candle_core::Error> + Send>(
    n: usize,
    device: &Device,
    loss: impl Fn(Range<usize>) -> Result<(Tensor, T), E> + Sync,
) -> Result<Vec<ShardGrads<T>>, E> {
    map_shards(&split(n, device), |r| {
        let share = r.len() as f64 / n.max(1) as f64;
        let (l, extra) = loss(r)?;
        let grads = (l * share).and_then(|l| l.backward())?;
        Ok(ShardGrads { grads, share, extra })
    })
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_batch_in_near_equal_parts() {
        assert_eq!(shard_ranges(7, 2), vec![0..4, 4..7]);
        assert_eq!(shard_ranges(2, 4), vec![0..1, 1..2]);
        assert_eq!(shard_ranges(0, 2), vec![0..0]);
    }

    #[test]
    fn shards_run_inside_are_not_split_again() {
        let counts = map_shards(&shard_ranges(4, 2), |_| shard_count(4, &Device::Cpu));
        assert_eq!(counts, vec![1, 1]);
    }
}
