//! `ddpo::kernels::group_norm` (with and without the fused SiLU) against candle-nn's composed
//! GroupNorm (then `silu`), and the conv's fused bias against a separate broadcast add, on the
//! CPU, forward and forward+backward (loss = sum), at the default UNet's typical shapes.
//!
//! Criterion does the careful timing; a short summary pass afterwards prints median ms and
//! the ours/candle ratio per case (skip it with `NORM_SUMMARY=0`).

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Module, Result, Tensor, Var};
use common::{median_ms, Impl};
use criterion::Criterion;

/// One benchmarked GroupNorm: x (n, c, h, w) in `groups` groups, optionally followed by SiLU.
#[derive(Clone, Copy)]
struct NormCase {
    name: &'static str,
    dims: (usize, usize, usize, usize),
    groups: usize,
    silu: bool,
}

const NORMS: &[NormCase] = &[
    NormCase { name: "gn_64x32x32x32", dims: (64, 32, 32, 32), groups: 32, silu: false },
    NormCase { name: "gn_silu_64x32x32x32", dims: (64, 32, 32, 32), groups: 32, silu: true },
    NormCase { name: "gn_64x64x16x16", dims: (64, 64, 16, 16), groups: 32, silu: false },
    NormCase { name: "gn_silu_64x64x16x16", dims: (64, 64, 16, 16), groups: 32, silu: true },
];

/// The inputs of one GroupNorm case, as variables so that backward reaches them.
struct NormInputs {
    x: Var,
    w: Var,
    b: Var,
}

impl NormCase {
    fn inputs(&self) -> Result<NormInputs> {
        let c = self.dims.1;
        Ok(NormInputs {
            x: Var::randn(0.5f32, 2.0, self.dims, &Device::Cpu)?,
            w: Var::randn(1f32, 0.1, c, &Device::Cpu)?,
            b: Var::randn(0f32, 0.1, c, &Device::Cpu)?,
        })
    }

    fn run(&self, imp: Impl, v: &NormInputs, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (v.w.as_tensor(), v.b.as_tensor());
        match imp {
            Impl::Ours => ddpo::kernels::group_norm(x, w, b, self.groups, 1e-5, self.silu),
            Impl::Candle => {
                let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), self.dims.1, self.groups, 1e-5)?;
                let y = gn.forward(x)?;
                if self.silu {
                    y.silu()
                } else {
                    Ok(y)
                }
            }
        }
    }

    /// Forward only, as at sampling time (no gradient graph kept).
    fn fwd(&self, imp: Impl, v: &NormInputs) -> Result<()> {
        self.run(imp, v, &v.x.as_tensor().detach()).map(drop)
    }

    /// Forward, loss = sum, backward to x, weight and bias, as in training.
    fn fwd_bwd(&self, imp: Impl, v: &NormInputs) -> Result<()> {
        self.run(imp, v, v.x.as_tensor())?.sum_all()?.backward().map(drop)
    }
}

/// The conv-bias case: a 3x3 conv 32->32 on (64, 32, 32, 32) with its bias fused into the
/// conv node (ours) or added by candle's broadcast add after our bias-free conv.
struct BiasInputs {
    x: Var,
    w: Var,
    b: Var,
}

impl BiasInputs {
    fn new() -> Result<Self> {
        Ok(Self {
            x: Var::randn(0f32, 1.0, (64, 32, 32, 32), &Device::Cpu)?,
            w: Var::randn(0f32, 0.05, (32, 32, 3, 3), &Device::Cpu)?,
            b: Var::randn(0f32, 0.1, 32, &Device::Cpu)?,
        })
    }

    fn fwd_bwd(&self, imp: Impl) -> Result<()> {
        let (x, w, b) = (self.x.as_tensor(), self.w.as_tensor(), self.b.as_tensor());
        let y = match imp {
            Impl::Ours => ddpo::kernels::conv2d(x, w, Some(b), 1, 1)?,
            Impl::Candle => {
                ddpo::kernels::conv2d(x, w, None, 1, 1)?.broadcast_add(&b.reshape((1, 32, 1, 1))?)?
            }
        };
        y.sum_all()?.backward().map(drop)
    }
}

fn bench_all(c: &mut Criterion) -> Result<()> {
    for case in NORMS {
        let v = case.inputs()?;
        let mut group = c.benchmark_group(format!("norm/{}", case.name));
        for imp in [Impl::Ours, Impl::Candle] {
            group.bench_function(format!("fwd/{}", imp.label()), |b| {
                b.iter(|| black_box(case.fwd(imp, &v).unwrap()))
            });
            group.bench_function(format!("fwd_bwd/{}", imp.label()), |b| {
                b.iter(|| black_box(case.fwd_bwd(imp, &v).unwrap()))
            });
        }
        group.finish();
    }
    let bias = BiasInputs::new()?;
    let mut group = c.benchmark_group("norm/conv3x3_bias_64x32x32x32");
    for imp in [Impl::Ours, Impl::Candle] {
        group.bench_function(format!("fwd_bwd/{}", imp.label()), |b| {
            b.iter(|| black_box(bias.fwd_bwd(imp).unwrap()))
        });
    }
    group.finish();
    Ok(())
}

fn print_row(name: &str, pass: &str, ours: f64, candle: f64) {
    println!("{name:<30} {pass:>8} {ours:>9.2} {candle:>9.2} {:>7.3}", ours / candle);
}

/// Prints median ms and ours/candle per case for forward and forward+backward.
fn summary() -> Result<()> {
    println!("\n{:<30} {:>8} {:>9} {:>9} {:>7}", "case", "pass", "ours ms", "candle ms", "ratio");
    for case in NORMS {
        let v = case.inputs()?;
        let fwd = |imp| median_ms(7, || case.fwd(imp, &v));
        print_row(case.name, "fwd", fwd(Impl::Ours)?, fwd(Impl::Candle)?);
        let both = |imp| median_ms(7, || case.fwd_bwd(imp, &v));
        print_row(case.name, "fwd+bwd", both(Impl::Ours)?, both(Impl::Candle)?);
    }
    let bias = BiasInputs::new()?;
    let both = |imp| median_ms(7, || bias.fwd_bwd(imp));
    print_row("conv3x3_bias_64x32x32x32", "fwd+bwd", both(Impl::Ours)?, both(Impl::Candle)?);
    Ok(())
}

fn main() -> Result<()> {
    // Same allocator settings for both implementations, whichever runs first.
    ddpo::kernels::alloc::reuse_freed_memory();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_all(&mut c)?;
    c.final_summary();
    if std::env::var("NORM_SUMMARY").map_or(true, |v| v != "0") {
        summary()?;
    }
    Ok(())
}
