//! Script reward overhead as a share of epoch time, for the default reward (`scripts/reward.rhai`,
//! `-img.jpeg_size(95)`) at default settings (`ddpo train` defaults: 32 samples per epoch, 20 DDIM
//! steps, the shipped default model). Times (median of 5) the script reward on one epoch's 32
//! images, the same score computed by the Rust built-in, and one whole epoch (sampling, reward,
//! update) once; prints the script's share and its extra cost over Rust. Target: < 1%.
//!
//! `cargo bench --bench script` (the epoch takes minutes on a small CPU).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ddpo::ddpo::{FixedPrompts, TrainConfig, Trainer};
use ddpo::policy::Policy;
use ddpo::reward::Reward;
use ddpo::script::{Limits, ScriptSet};

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = TrainConfig::default();
    let policy = Policy::load_trainable(&root.join("models/shapes-unet.safetensors"), &candle_core::Device::Cpu)?;
    let prompts = FixedPrompts::shapes_default();
    let batch: Vec<String> = prompts.0.iter().cycle().take(config.samples_per_epoch).cloned().collect();
    // One epoch's worth of real samples, to score.
    let images = ddpo::pretrain::eval::sample_images(&policy, &batch, &config.sampler, 0, config.sample_batch_size)?;

    let script = Arc::new(ScriptSet::new(Limits::default(), Arc::new(|_: &str| {})).load_reward(&root.join("scripts/reward.rhai"))?);
    let builtin = ddpo::reward::JpegCompressibility;
    let script_ms = common::median_ms(5, || script.score(&images, &batch).map(|_| ()).map_err(candle_core::Error::wrap))?;
    let rust_ms = common::median_ms(5, || builtin.score(&images, &batch).map(|_| ()).map_err(candle_core::Error::wrap))?;

    let mut trainer = Trainer::new(config.clone(), policy, script.clone(), Box::new(prompts))?;
    let t = Instant::now();
    trainer.run_epoch()?;
    let epoch_ms = t.elapsed().as_secs_f64() * 1e3;

    println!("default reward script on {} images ({}x{}): {script_ms:.2} ms; Rust built-in: {rust_ms:.2} ms", images.len(), images[0].width(), images[0].height());
    println!("one epoch at default settings: {:.1} s", epoch_ms / 1e3);
    println!(
        "script reward share of the epoch: {:.4}% (target < 1%); script overhead over Rust: {:.4}%",
        100.0 * script_ms / epoch_ms,
        100.0 * (script_ms - rust_ms) / epoch_ms
    );
    Ok(())
}
