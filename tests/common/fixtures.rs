//! Fixtures shared by the policy, trainer and run tests: the tiny shapes policy, its two prompts,
//! and a small DDPO configuration.

use candle_core::Device;
use ddpo::ddpo::{FixedPrompts, Normalisation, TrainConfig};
use ddpo::family::{PixelPolicy, Policy, PolicyConfig, SamplerConfig};
use ddpo::optim::AdamWConfig;

/// The two shapes-world captions the tiny tests train and sample on.
pub fn prompt_pair() -> Vec<String> {
    vec!["a red circle on a blue background".into(), "two small green squares on a black background".into()]
}

pub fn prompt_source() -> Box<FixedPrompts> {
    Box::new(FixedPrompts(prompt_pair()))
}

/// A randomly initialised tiny policy (seeded), trainable.
pub fn tiny_policy(seed: u64) -> Policy {
    Policy::new_random(PolicyConfig::tiny_test(), seed, &Device::Cpu).unwrap()
}

/// The same, as the pixel family the trainer takes.
pub fn tiny_family(seed: u64) -> Box<PixelPolicy> {
    Box::new(PixelPolicy(tiny_policy(seed)))
}

/// Writes a seeded tiny policy to `dir/tiny.safetensors` (+ `.json`) and returns its path.
pub fn save_tiny_policy(dir: &std::path::Path) -> std::path::PathBuf {
    let model = dir.join("tiny.safetensors");
    tiny_policy(0).save(&model).unwrap();
    model
}

/// A small, fast DDPO configuration: 8 samples of 3 steps, per-prompt normalisation.
pub fn small_config() -> TrainConfig {
    TrainConfig {
        samples_per_epoch: 8,
        sample_batch_size: 4,
        train_batch_size: 4,
        clip_range: 0.2,
        normalisation: Normalisation::PerPrompt { buffer_size: 8, min_count: 4 },
        optimizer: AdamWConfig { lr: 1e-3, ..Default::default() },
        sampler: SamplerConfig::new(3, 1.0, 2.0),
        timestep_fraction: 0.67,
        seed: 5,
        ..Default::default()
    }
}

/// A run's `metrics.jsonl` records without the wall-clock and memory fields (what two runs of
/// the same seed must agree on).
pub fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["seconds_sampling", "seconds_reward", "seconds_training", "rss_mb", "peak_rss_mb"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

/// A script log that drops everything.
pub fn quiet() -> ddpo::script::Log {
    std::sync::Arc::new(|_: &str| {})
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Rewrites the JSON file at `path` through `edit` (for breaking a fixture's config).
pub fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) -> anyhow::Result<()> {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

/// Runs the `ddpo` binary with `args`: whether it succeeded, and its stderr.
pub fn ddpo_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).output().expect("run ddpo");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}
