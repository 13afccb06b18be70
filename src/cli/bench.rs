//! `ddpo bench`: times the fixed benchmark workloads ([`crate::bench`]) on the default model
//! configuration and prints one JSON object to stdout.

use crate::bench::{self, BenchConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timed runs per workload (the report gives their median, min and max).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Untimed runs per workload before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Run one workload: conv, group_norm, attention, unet_fwd, train_step, ddim, ddpo_epoch,
    /// sd_epoch_lora or sd_epoch_full (the last two on tests/fixtures/tiny-sd), clip, or vlm
    /// (the VLM client's requests/s and a VLM reward's per-image cost against the CLIP reward,
    /// on the loopback test server).
    #[arg(long)]
    only: Option<String>,
    /// Small sizes, one repeat and no warmup: a smoke test of the harness, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Print the default policy configuration (JSON, diffusers field names) and exit.
    #[arg(long)]
    print_config: bool,
    /// Fill the diffusers folder DIR, which has configs and a tokenizer but no weights, with
    /// seeded random weights (UNet, text encoder, VAE decoder) and exit: a model of a real size
    /// to time without downloading it (`benches/gpu/sd15` holds Stable Diffusion 1.5's configs).
    #[arg(long, value_name = "DIR")]
    random_weights: Option<std::path::PathBuf>,
}

pub fn exec(args: Args) -> anyhow::Result<()> {
    if args.print_config {
        let cfg = crate::family::PolicyConfig::shapes_default();
        println!("{}", serde_json::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if let Some(dir) = &args.random_weights {
        let counts = crate::family::sd::random::write_random_weights(dir, 0)?;
        println!("{}", serde_json::to_string_pretty(&counts)?);
        return Ok(());
    }
    let cfg = if args.quick {
        BenchConfig { repeats: 1, warmup: 0, quick: true }
    } else {
        BenchConfig { repeats: args.repeats, warmup: args.warmup, quick: false }
    };
    let report = bench::run(&cfg, args.only.as_deref())?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
