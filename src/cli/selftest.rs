//! `ddpo selftest`: the golden checks ([`crate::selftest`]) on a chosen device and dtype; one
//! line per check, exit non-zero when any fails. What a user runs after a CUDA build, and what a
//! lent GPU machine runs with only the binary and the fixtures.

use std::path::PathBuf;

use super::{device, resolve_model, DtypeArg, DEFAULT_MODEL};
use crate::selftest::{self, SelftestOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Compute device: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Frozen weights' dtype for the Stable Diffusion checks (tolerances loosen for f16/bf16).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Folder holding tiny-sd/ and shapes-golden/ (default: the source checkout's tests/fixtures).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// The shipped model whose reference outputs shapes-golden/ holds.
    #[arg(long, default_value = DEFAULT_MODEL)]
    shapes_model: PathBuf,
    /// Recompute shapes-golden/ from the shipped model on CPU in f32, then check as usual.
    #[arg(long, hide = true)]
    write_shapes_golden: bool,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    let options = SelftestOptions {
        device: device(&args.device)?,
        dtype: args.dtype.into(),
        fixtures: args.fixtures.unwrap_or_else(selftest::default_fixtures),
        shapes_model: resolve_model(&args.shapes_model),
    };
    if args.write_shapes_golden {
        let path = selftest::shapes::write_golden(&options.shapes_model, &options.fixtures)?;
        eprintln!("wrote {}", path.display());
    }
    println!("selftest on {} with {:?} weights, fixtures {}", args.device, args.dtype, options.fixtures.display());
    let report = selftest::run(&options);
    for line in &report.checks {
        println!("{line}");
    }
    let failed: Vec<&str> = report.failed().iter().map(|c| c.name.as_str()).collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} checks failed: {} (a wrong fixture, or a numerical regression on this device)",
        failed.len(),
        report.checks.len(),
        failed.join(", ")
    );
    println!("all {} checks passed", report.checks.len());
    Ok(())
}
