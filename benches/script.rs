//! Script overhead as a share of epoch time, for the default scripts at default settings (what
//! `ddpo train` with no flags runs: `scripts/reward.rhai` = `-img.jpeg_size(95)`,
//! `scripts/prompts.rhai`, `scripts/hooks.rhai`; 32 samples per epoch, 20 DDIM steps, the
//! shipped default model). Times (median of 5) the script reward on one epoch's 32 images, the
//! same score computed by the Rust built-in, the epoch's 32 prompt draws and its hook call, the
//! reward on 2 threads (each worker has its own engine; the compiled AST is shared), and one
//! whole epoch (sampling, reward, update) once; prints the scripts' share and their extra cost
//! over Rust. Target: < 1%. The epoch leaves out the KL term `ddpo train` adds by default: it
//! would only lengthen the epoch and shrink the scripts' share.
//!
//! `cargo bench --bench script` (the epoch takes minutes on a small CPU).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ddpo::ddpo::{FixedPrompts, PromptSource, TrainConfig, Trainer};
use ddpo::family::{PixelPolicy, Policy};
use ddpo::reward::Reward;
use ddpo::script::{Limits, ScriptSet};
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = TrainConfig::default();
    let policy = PixelPolicy(Policy::load_trainable(&root.join("models/shapes-unet.safetensors"), &candle_core::Device::Cpu)?);
    let batch: Vec<String> = FixedPrompts::shapes_default().0.iter().cycle().take(config.samples_per_epoch).cloned().collect();
    // One epoch's worth of real samples, to score.
    let images = ddpo::sampler::sample_images(&policy, &batch, &config.sampler, 0, config.sample_batch_size)?;

    let mut scripts = ScriptSet::new(Limits::default(), Arc::new(|_: &str| {}));
    let script = Arc::new(scripts.load_reward(&root.join("scripts/reward.rhai"))?);
    let mut prompts = scripts.load_prompts(&root.join("scripts/prompts.rhai"))?;
    let hooks = scripts.load_hooks(&root.join("scripts/hooks.rhai"))?;
    let builtin = ddpo::reward::JpegCompressibility;
    let script_ms = common::median_ms(5, || script.score(&images, &batch).map(|_| ()).map_err(candle_core::Error::wrap))?;
    let rust_ms = common::median_ms(5, || builtin.score(&images, &batch).map(|_| ()).map_err(candle_core::Error::wrap))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let prompts_ms = common::median_ms(5, || {
        (0..config.samples_per_epoch).try_for_each(|_| prompts.next_prompt(&mut rng).map(|_| ())).map_err(candle_core::Error::wrap)
    })?;
    let hooks_ms = common::median_ms(5, || hooks.on_epoch_start(rhai::Map::new()).map(|_| ()).map_err(candle_core::Error::wrap))?;
    // Two reward workers, each scoring half the batch at once.
    let half = images.len() / 2;
    let parallel_ms = common::median_ms(5, || {
        std::thread::scope(|s| {
            let parts = [(&images[..half], &batch[..half]), (&images[half..], &batch[half..])];
            let handles: Vec<_> = parts.iter().map(|(i, p)| s.spawn(|| script.score(i, p).map(|_| ()))).collect();
            handles.into_iter().try_for_each(|h| h.join().expect("worker"))
        })
        .map_err(candle_core::Error::wrap)
    })?;

    let prompts = scripts.load_prompts(&root.join("scripts/prompts.rhai"))?;
    let mut trainer = Trainer::new(config.clone(), Box::new(policy), script.clone(), Box::new(prompts))?;
    let t = Instant::now();
    trainer.run_epoch()?;
    let epoch_ms = t.elapsed().as_secs_f64() * 1e3;

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("machine: {cores} cores, load average {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("default reward script on {} images ({}x{}): {script_ms:.2} ms; Rust built-in: {rust_ms:.2} ms", images.len(), images[0].width(), images[0].height());
    println!("same on 2 worker threads (an engine each, one shared AST): {parallel_ms:.2} ms ({:.2}x)", script_ms / parallel_ms);
    println!("prompt script, {} draws: {prompts_ms:.3} ms; hooks on_epoch_start: {hooks_ms:.3} ms", config.samples_per_epoch);
    println!("one epoch at default settings: {:.1} s", epoch_ms / 1e3);
    let scripts_ms = script_ms + prompts_ms + hooks_ms;
    println!(
        "script reward share of the epoch: {:.4}% (target < 1%); all scripts: {:.4}%; script overhead over Rust: {:.4}%",
        100.0 * script_ms / epoch_ms,
        100.0 * scripts_ms / epoch_ms,
        100.0 * (scripts_ms - rust_ms) / epoch_ms
    );
    Ok(())
}
