//! Keeps freed memory in the process instead of handing it back to the kernel.
//!
//! candle allocates a fresh buffer for every tensor. glibc serves buffers above its mmap
//! threshold (at most 32 MiB) with a fresh `mmap` and unmaps them on free, and trims the heap
//! top once enough is free, so every large tensor is paid for again in page faults, which cost
//! several times the copying they serve. Turning off mmap-backed allocations and heap trimming lets the next step's tensors reuse the
//! pages of the last step's. The price is that the resident size stays at its peak, which a
//! training process reaches on its first step anyway.
//!
//! Batch shards ([`super::shards`]) run on threads of their own, which glibc would give arenas
//! of their own, each keeping its own peak; one arena lets the shards reuse each other's freed
//! pages for a little lock contention.

use std::sync::Once;

/// Makes glibc malloc recycle freed memory instead of unmapping it; idempotent, and a no-op
/// on platforms other than glibc Linux. Called by [`super::conv2d`] on its first CPU call and
/// before the first batch shard starts its thread.
pub fn reuse_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(tune_glibc);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_glibc() {
    // From glibc's <malloc.h>.
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_MAX: i32 = -4;
    const M_ARENA_MAX: i32 = -8;
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: mallopt only adjusts allocator parameters; all three are valid for any value >= 0
    // (M_ARENA_MAX >= 1).
    // Its return value (0 on failure) needs no handling: failing leaves the defaults.
    unsafe {
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
        mallopt(M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_glibc() {}
