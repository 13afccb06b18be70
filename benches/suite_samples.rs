//! Samples a model on every `stride`th prompt of the compositional suite and writes each image as
//! its own PNG, plus upscaled contact sheets for labelling by eye and a JSON index of the prompts;
//! the data behind the detector's hand-labelled fixture (tests/fixtures/detector/).
//!
//! cargo bench --bench suite_samples -- MODEL OUT_DIR [STRIDE] [SEED]

use std::path::PathBuf;

use anyhow::Context;
use ddpo::family::{OpenOptions, SamplerConfig};
use ddpo::sampler::sample_images;
use ddpo::world::suite::compositional_v1;

fn main() -> anyhow::Result<()> {
    // `cargo bench` adds `--bench` to the arguments.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    anyhow::ensure!(args.len() >= 2, "usage: suite_samples MODEL OUT_DIR [STRIDE] [SEED]");
    let (model, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let stride: usize = args.get(2).map_or(Ok(5), |s| s.parse()).context("STRIDE must be a number")?;
    let seed: u64 = args.get(3).map_or(Ok(7), |s| s.parse()).context("SEED must be a number")?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let policy = ddpo::family::open_frozen(&model, None, &OpenOptions::default(), &candle_core::Device::Cpu)?;
    let cfg = SamplerConfig::new(20, 1.0, 5.0);
    let prompts: Vec<String> = compositional_v1().into_iter().step_by(stride).map(|p| p.text).collect();
    let images = sample_images(policy.as_ref(), &prompts, &cfg, seed, 50)?;
    let mut index = Vec::new();
    for (i, (img, prompt)) in images.iter().zip(&prompts).enumerate() {
        let file = format!("{i:03}.png");
        img.save(out.join(&file)).with_context(|| format!("cannot write {file}"))?;
        index.push(serde_json::json!({ "file": file, "prompt": prompt }));
    }
    std::fs::write(out.join("prompts.json"), serde_json::to_string_pretty(&index)?)?;
    for (sheet, chunk) in images.chunks(12).enumerate() {
        let labels: Vec<String> = (0..chunk.len()).map(|j| format!("{:03}", sheet * 12 + j)).collect();
        let grid = ddpo::render::labelled_grid(chunk, &labels, 4, 8);
        ddpo::render::save_png(&grid, &out.join(format!("sheet-{sheet:02}.png")))?;
    }
    eprintln!("wrote {} samples to {}", images.len(), out.display());
    Ok(())
}
