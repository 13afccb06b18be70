//! Pieces shared by the kernel benches: which implementation runs, and a median timer.

use std::time::Instant;

use candle_core::Result;

/// Our kernel or candle's own composed ops.
#[derive(Clone, Copy, PartialEq)]
pub enum Impl {
    Ours,
    Candle,
}

impl Impl {
    pub fn label(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::Candle => "candle",
        }
    }
}

/// Median wall time in ms of `reps` runs after one warm-up run.
pub fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}
