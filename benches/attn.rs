//! The attention kernels against the composed candle paths they replace, on the CPU, forward
//! + backward (loss = sum): `ddpo::kernels::softmax_last_dim` (scale, mask, softmax) at the
//! UNet's 8x8 self-attention and the text encoder's causal shapes, and `ddpo::kernels::geglu`
//! at the 8x8 level's feed-forward.
//!
//! Criterion does the careful timing; a short summary pass afterwards prints median ms and
//! the ours/candle ratio per case (skip it with `ATTN_SUMMARY=0`).

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Result, Tensor, Var, D};
use common::{median_ms, Impl};
use criterion::Criterion;

/// One benchmarked case: an input variable and how to run it.
struct Case {
    name: &'static str,
    x: Var,
    mask: Option<Tensor>,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    Softmax,
    Geglu,
}

/// (L, L) causal mask: 0 on and below the diagonal, -inf above.
fn causal_mask(len: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (len, len), &Device::Cpu)
}

fn cases() -> Result<Vec<Case>> {
    let dev = &Device::Cpu;
    Ok(vec![
        Case {
            name: "softmax_256x64x64",
            x: Var::randn(0f32, 3.0, (256, 64, 64), dev)?,
            mask: None,
            kind: Kind::Softmax,
        },
        Case {
            name: "softmax_causal_64x4x16x16",
            x: Var::randn(0f32, 3.0, (64, 4, 16, 16), dev)?,
            mask: Some(causal_mask(16)?),
            kind: Kind::Softmax,
        },
        Case {
            name: "geglu_64x64x512",
            x: Var::randn(0f32, 1.0, (64, 64, 512), dev)?,
            mask: None,
            kind: Kind::Geglu,
        },
    ])
}

impl Case {
    /// Forward, loss = sum, backward, as in training.
    fn fwd_bwd(&self, imp: Impl) -> Result<()> {
        let x = self.x.as_tensor();
        let y = match (self.kind, imp) {
            (Kind::Softmax, Impl::Ours) => ddpo::kernels::softmax_last_dim(x, 0.125, self.mask.as_ref())?,
            (Kind::Softmax, Impl::Candle) => {
                let z = (x * 0.125)?;
                let z = match &self.mask {
                    Some(m) => z.broadcast_add(m)?,
                    None => z,
                };
                candle_nn::ops::softmax(&z, D::Minus1)?
            }
            (Kind::Geglu, Impl::Ours) => ddpo::kernels::geglu(x)?,
            (Kind::Geglu, Impl::Candle) => {
                let chunks = x.chunk(2, D::Minus1)?;
                (&chunks[0] * chunks[1].gelu_erf()?)?
            }
        };
        // A weighted sum: the softmax rows sum to 1, so a plain sum has a zero gradient.
        (y.sqr()?).sum_all()?.backward().map(drop)
    }
}

fn bench_all(c: &mut Criterion, cases: &[Case]) {
    for case in cases {
        let mut group = c.benchmark_group(format!("attn/{}", case.name));
        for imp in [Impl::Ours, Impl::Candle] {
            group.bench_function(format!("fwd_bwd/{}", imp.label()), |b| {
                b.iter(|| black_box(case.fwd_bwd(imp).unwrap()))
            });
        }
        group.finish();
    }
}

/// Prints median ms and ours/candle per case.
fn summary(cases: &[Case]) -> Result<()> {
    println!("\n{:<30} {:>9} {:>9} {:>7}", "case (fwd+bwd)", "ours ms", "candle ms", "ratio");
    for case in cases {
        let ours = median_ms(9, || case.fwd_bwd(Impl::Ours))?;
        let candle = median_ms(9, || case.fwd_bwd(Impl::Candle))?;
        println!("{:<30} {ours:>9.2} {candle:>9.2} {:>7.3}", case.name, ours / candle);
    }
    Ok(())
}

fn main() -> Result<()> {
    // Same allocator settings for both implementations, whichever runs first.
    ddpo::kernels::alloc::reuse_freed_memory();
    let cases = cases()?;
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    bench_all(&mut c, &cases);
    c.final_summary();
    if std::env::var("ATTN_SUMMARY").map_or(true, |v| v != "0") {
        summary(&cases)?;
    }
    Ok(())
}
