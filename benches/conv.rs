//! `ddpo::kernels::conv2d` against candle's own conv2d on the CPU, forward and
//! forward+backward (loss = sum), at the headline shape and the default UNet's typical ones.
//!
//! Criterion does the careful timing; a short summary pass afterwards prints median ms,
//! GFLOP/s and the ours/candle ratio per shape (skip it with `CONV_SUMMARY=0`, restrict it to
//! shapes whose name contains `CONV_SHAPE`). `CONV_PARTS=1` adds a breakdown of our pieces.

mod common;

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Result, Tensor, Var};
use common::{median_ms, Impl};
use criterion::Criterion;

/// One benchmarked convolution: x (n, c, h, w), o output channels, k x k kernel.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "16x64x32x32_o64_k3",
        n: 16,
        c: 64,
        h: 32,
        w: 32,
        o: 64,
        k: 3,
        stride: 1,
        pad: 1,
    },
    Shape {
        name: "64x32x32x32_o32_k3",
        n: 64,
        c: 32,
        h: 32,
        w: 32,
        o: 32,
        k: 3,
        stride: 1,
        pad: 1,
    },
    Shape {
        name: "64x64x16x16_o64_k3",
        n: 64,
        c: 64,
        h: 16,
        w: 16,
        o: 64,
        k: 3,
        stride: 1,
        pad: 1,
    },
    Shape {
        name: "64x32x32x32_o32_k3s2",
        n: 64,
        c: 32,
        h: 32,
        w: 32,
        o: 32,
        k: 3,
        stride: 2,
        pad: 1,
    },
    Shape {
        name: "64x64x16x16_o32_k1",
        n: 64,
        c: 64,
        h: 16,
        w: 16,
        o: 32,
        k: 1,
        stride: 1,
        pad: 0,
    },
];

impl Shape {
    /// Multiply-adds times two for one forward pass.
    fn fwd_flops(&self) -> f64 {
        let ho = (self.h + 2 * self.pad - self.k) / self.stride + 1;
        let wo = (self.w + 2 * self.pad - self.k) / self.stride + 1;
        2.0 * (self.n * self.o * ho * wo * self.c * self.k * self.k) as f64
    }

    fn inputs(&self) -> Result<(Var, Var)> {
        let x = Tensor::randn(0f32, 1.0, (self.n, self.c, self.h, self.w), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 0.05, (self.o, self.c, self.k, self.k), &Device::Cpu)?;
        Ok((Var::from_tensor(&x)?, Var::from_tensor(&w)?))
    }
}

impl Impl {
    fn conv(self, s: &Shape, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self {
            Impl::Ours => ddpo::kernels::conv2d(x, w, None, s.stride, s.pad),
            Impl::Candle => x.conv2d(w, s.pad, s.stride, 1, 1),
        }
    }

    /// Forward only, as at sampling time (no gradient graph kept).
    fn fwd(self, s: &Shape, x: &Var, w: &Var) -> Result<Tensor> {
        self.conv(s, &x.as_tensor().detach(), &w.as_tensor().detach())
    }

    /// Forward, loss = sum, backward to both x and w, as in training.
    fn fwd_bwd(self, s: &Shape, x: &Var, w: &Var) -> Result<candle_core::backprop::GradStore> {
        self.conv(s, x.as_tensor(), w.as_tensor())?
            .sum_all()?
            .backward()
    }
}

fn bench_all(c: &mut Criterion) -> Result<()> {
    for s in SHAPES {
        let (x, w) = s.inputs()?;
        let mut group = c.benchmark_group(format!("conv/{}", s.name));
        for imp in [Impl::Ours, Impl::Candle] {
            group.bench_function(format!("fwd/{}", imp.label()), |b| {
                b.iter(|| black_box(imp.fwd(s, &x, &w).unwrap()))
            });
            group.bench_function(format!("fwd_bwd/{}", imp.label()), |b| {
                b.iter(|| black_box(imp.fwd_bwd(s, &x, &w).unwrap()))
            });
        }
        group.finish();
    }
    Ok(())
}

/// Prints median ms, GFLOP/s and ours/candle per shape for forward and forward+backward.
fn summary() -> Result<()> {
    println!(
        "\n{:<22} {:>8} {:>9} {:>9} {:>7} {:>8} {:>8}",
        "shape", "pass", "ours ms", "candle ms", "ratio", "ours GF", "cand GF"
    );
    let only = std::env::var("CONV_SHAPE").unwrap_or_default();
    for s in SHAPES.iter().filter(|s| s.name.contains(&only)) {
        let (x, w) = s.inputs()?;
        for (pass, flops) in [("fwd", s.fwd_flops()), ("fwd+bwd", 3.0 * s.fwd_flops())] {
            let time = |imp: Impl| {
                median_ms(7, || match pass {
                    "fwd" => imp.fwd(s, &x, &w).map(drop),
                    _ => imp.fwd_bwd(s, &x, &w).map(drop),
                })
            };
            let (ours, candle) = (time(Impl::Ours)?, time(Impl::Candle)?);
            println!(
                "{:<22} {:>8} {:>9.2} {:>9.2} {:>7.3} {:>8.1} {:>8.1}",
                s.name,
                pass,
                ours,
                candle,
                ours / candle,
                flops / ours / 1e6,
                flops / candle / 1e6
            );
        }
    }
    Ok(())
}

/// Times the building blocks of our convolution at the headline shape (`CONV_PARTS=1`), to
/// show where forward and backward time goes and which matmul layouts are fastest.
fn parts() -> Result<()> {
    use ddpo::kernels::im2col::{Col2Im, ConvGeom, Im2Col};
    let s = SHAPES[0];
    let g = ConvGeom::new((s.n, s.c, s.h, s.w), (s.k, s.k), s.stride, s.pad)?;
    let (k, p) = (g.k(), g.p());
    let x = Tensor::randn(0f32, 1.0, (s.n, s.c, s.h, s.w), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 0.05, (s.o, k), &Device::Cpu)?;
    let cols = x.apply_op1_no_bwd(&Im2Col(g))?;
    let grad = Tensor::randn(0f32, 1.0, (s.n, s.o, p), &Device::Cpu)?;
    let cols_b = cols.transpose(0, 1)?.contiguous()?.reshape((k, s.n * p))?;
    let grad_b = grad
        .transpose(0, 1)?
        .contiguous()?
        .reshape((s.o, s.n * p))?;
    let wb = w.unsqueeze(0)?.broadcast_as((s.n, s.o, k))?;
    let gf = s.fwd_flops() / 1e6;
    let report = |name: &str, flops: f64, f: &dyn Fn() -> Result<Tensor>| -> Result<()> {
        let ms = median_ms(7, || f().map(drop))?;
        println!("{name:<44} {ms:>8.2} ms {:>7.1} GF/s", flops / ms);
        Ok(())
    };
    report("im2col", 0.0, &|| x.apply_op1_no_bwd(&Im2Col(g)))?;
    report("col2im", 0.0, &|| cols.apply_op1_no_bwd(&Col2Im(g)))?;
    report("fwd  W(O,K) bcast @ cols(N,K,P)", gf, &|| wb.matmul(&cols))?;
    report("fwd  W(O,K) @ cols(K,NP)", gf, &|| w.matmul(&cols_b))?;
    report("dW   grad(N,O,P) @ cols^T(N,P,K), sum N", gf, &|| {
        grad.matmul(&cols.t()?)?.sum(0)
    })?;
    report("dW   grad(O,NP) @ cols^T(NP,K)", gf, &|| {
        grad_b.matmul(&cols_b.t()?)
    })?;
    report("dcol W^T bcast (N,K,O) @ grad(N,O,P)", gf, &|| {
        wb.t()?.matmul(&grad)
    })?;
    report("dcol W^T(K,O) @ grad(O,NP)", gf, &|| w.t()?.matmul(&grad_b))?;
    // Materialised: candle mis-handles a zero-batch-stride rhs with a column-major lhs.
    let wtb = w
        .t()?
        .unsqueeze(0)?
        .broadcast_as((s.n, k, s.o))?
        .contiguous()?;
    report("fwdT cols^T(N,P,K) @ W^T (N,K,O)", gf, &|| {
        cols.t()?.matmul(&wtb)
    })?;
    report("fwdT cols^T(NP,K) @ W^T(K,O)", gf, &|| {
        cols_b.t()?.matmul(&w.t()?)
    })?;
    report("dWT  cols(N,K,P) @ grad^T(N,P,O), sum N", gf, &|| {
        cols.matmul(&grad.t()?)?.sum(0)
    })?;
    report("dWT  cols(K,NP) @ grad^T(NP,O)", gf, &|| {
        cols_b.matmul(&grad_b.t()?)
    })?;
    report("transpose (N,O,P)->(O,N,P) copy", 0.0, &|| {
        grad.transpose(0, 1)?.contiguous()
    })?;
    Ok(())
}

fn main() -> Result<()> {
    // Same allocator settings for both implementations, whichever runs first.
    ddpo::kernels::alloc::reuse_freed_memory();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_all(&mut c)?;
    c.final_summary();
    if std::env::var("CONV_PARTS").is_ok_and(|v| v == "1") {
        parts()?;
    }
    if std::env::var("CONV_SUMMARY").map_or(true, |v| v != "0") {
        summary()?;
    }
    Ok(())
}
