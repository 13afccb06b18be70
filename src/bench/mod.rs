//! The benchmark harness behind `ddpo bench`: fixed workloads on the default configuration
//! (single kernels, the attention block, the whole UNet, a training step, DDIM sampling, a
//! DDPO epoch, DDPO epochs on the tiny Stable Diffusion fixture with LoRA or the full UNet, and
//! CLIP image embeddings, the VLM client and reward scripts against the loopback test server),
//! timed over repeats, with achieved GFLOP/s where the FLOP count is known and the
//! process's peak resident memory. Owns the timing and the JSON report, not the printing.

mod vlm;
mod workloads;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

pub use workloads::Sizes;

/// The workload groups, in run order; `--only` takes one of these names.
pub const WORKLOADS: &[&str] = &[
    "conv", "group_norm", "attention", "unet_fwd", "train_step", "ddim", "ddpo_epoch", "sd_epoch_lora", "sd_epoch_full", "clip", "vlm",
];

/// How a bench run is carried out.
#[derive(Debug, Clone, Copy)]
pub struct BenchConfig {
    /// Timed runs per workload.
    pub repeats: usize,
    /// Untimed runs before the timed ones.
    pub warmup: usize,
    /// Small sizes (a smoke test) instead of the default workloads.
    pub quick: bool,
}

/// The timings of one workload, in milliseconds, and its throughput where known.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// What was run, e.g. "x 16x64x32x32, 64 out, 3x3 pad 1".
    pub shape: String,
    pub repeats: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Achieved GFLOP/s at the median time; absent where the FLOP count is not known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// The process's peak resident memory (VmHWM) after this workload, in MiB.
    pub peak_rss_mb: f64,
    /// Items (e.g. image embeddings) per second at the median time, where a run has a count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items_per_s: Option<f64>,
    /// Resident memory (VmRSS, MiB) after each timed run, in run order: flat when nothing leaks
    /// (`ddpo bench --only ddpo_epoch --repeats 20 --warmup 0` checks 20 epochs).
    pub rss_mb_after_runs: Vec<f64>,
    /// Named parts of the median run, in seconds (the DDPO epoch's sampling / reward / training).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub parts_s: BTreeMap<String, f64>,
}

/// The whole report that `ddpo bench` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub implementation: String,
    pub threads: usize,
    pub quick: bool,
    pub workloads: BTreeMap<String, Timing>,
    /// Peak resident memory of the whole run, in MiB.
    pub peak_rss_mb: f64,
}

/// Runs the named workload groups (all of [`WORKLOADS`] when `only` is `None`).
pub fn run(cfg: &BenchConfig, only: Option<&str>) -> anyhow::Result<Report> {
    anyhow::ensure!(cfg.repeats > 0, "--repeats must be at least 1");
    let names: Vec<&str> = match only {
        Some(name) if WORKLOADS.contains(&name) => vec![name],
        Some(name) => anyhow::bail!("unknown workload {name:?} for --only (use one of: {})", WORKLOADS.join(", ")),
        None => WORKLOADS.to_vec(),
    };
    crate::kernels::alloc::reuse_freed_memory();
    let sizes = if cfg.quick { Sizes::quick() } else { Sizes::default() };
    let mut out = BTreeMap::new();
    for name in names {
        for (key, timing) in workloads::run_group(name, &sizes, cfg)? {
            out.insert(key, timing);
        }
    }
    Ok(Report {
        implementation: format!("ddpo {} (candle, CPU f32)", env!("CARGO_PKG_VERSION")),
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        quick: cfg.quick,
        workloads: out,
        peak_rss_mb: crate::io::peak_rss_mb()?,
    })
}

/// One timed run's result: its parts in seconds (empty for most workloads).
type Parts = BTreeMap<String, f64>;

/// Times `f` over `cfg.warmup` untimed and `cfg.repeats` timed runs.
fn measure(
    cfg: &BenchConfig,
    shape: String,
    flops: Option<f64>,
    mut f: impl FnMut() -> anyhow::Result<Parts>,
) -> anyhow::Result<Timing> {
    for _ in 0..cfg.warmup {
        f()?;
    }
    let mut runs: Vec<(f64, Parts)> = Vec::with_capacity(cfg.repeats);
    let mut rss_mb_after_runs = Vec::with_capacity(cfg.repeats);
    for _ in 0..cfg.repeats {
        let start = Instant::now();
        let parts = f()?;
        runs.push((start.elapsed().as_secs_f64() * 1e3, parts));
        rss_mb_after_runs.push(crate::io::memory_mb("VmRSS")?);
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median_ms, parts_s) = runs[runs.len() / 2].clone();
    Ok(Timing {
        shape,
        repeats: cfg.repeats,
        median_ms,
        min_ms: runs[0].0,
        max_ms: runs[runs.len() - 1].0,
        gflops: flops.map(|fl| fl / (median_ms * 1e6)),
        peak_rss_mb: crate::io::peak_rss_mb()?,
        items_per_s: None,
        rss_mb_after_runs,
        parts_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_workload_and_zero_repeats() {
        let cfg = BenchConfig { repeats: 1, warmup: 0, quick: true };
        let err = run(&cfg, Some("nope")).unwrap_err().to_string();
        assert!(err.contains("unknown workload") && err.contains("conv"), "{err}");
        let err = run(&BenchConfig { repeats: 0, ..cfg }, None).unwrap_err().to_string();
        assert!(err.contains("--repeats"), "{err}");
    }
}
