//! The `vlm` workloads of `ddpo bench`: how many requests per second the VLM client sustains
//! against the loopback test server (`reward::vlm::server`, in this process, so its detector
//! shares the CPU), and the per-image cost of a VLM reward script (`vlm_alignment.rhai`: one
//! question per image, then `text_similarity`) against the built-in CLIP reward script
//! (`clip_alignment.rhai`). Every timed run scores images it has not seen, so no cache answers.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;

use image::RgbImage;
use rayon::prelude::*;

use super::{measure, BenchConfig, Parts, Sizes, Timing};
use crate::reward::models::{resolve, LazyModels, ModelPaths};
use crate::reward::vlm::server::{Faults, Server, MODEL};
use crate::reward::vlm::{Vlm, VlmConfig};
use crate::reward::Reward;
use crate::script::{Limits, ScriptSet};

/// Runs the group: `vlm_requests`, `reward_clip_alignment`, `reward_vlm_alignment`.
pub(super) fn group(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Vec<(&'static str, anyhow::Result<Timing>)>> {
    let server = Server::start(0, Faults::default())?;
    let (n, concurrency) = sizes.vlm;
    let config = VlmConfig { url: server.url(), model: MODEL.into(), concurrency, ..Default::default() };
    // One batch of fresh images per run (warm-up runs included), so no cache answers.
    let batches: Vec<(Vec<RgbImage>, Vec<String>)> = (0..cfg.warmup + cfg.repeats)
        .map(|run| crate::world::ShapesWorld::default().batch(1000 + run as u64, n).into_iter().map(|s| (s.image, s.caption)).unzip())
        .collect();
    let clip = LazyModels::new(ModelPaths::default(), candle_core::Device::Cpu);
    let vlm = LazyModels::new(ModelPaths { vlm: Some(config.clone()), ..Default::default() }, candle_core::Device::Cpu);
    Ok(vec![
        ("vlm_requests", requests(&config, &batches, cfg)),
        ("reward_clip_alignment", script_reward("scripts/examples/clip_alignment.rhai", clip, &batches, cfg)),
        ("reward_vlm_alignment", script_reward("scripts/examples/vlm_alignment.rhai", vlm, &batches, cfg)),
    ])
}

/// One question per image of a batch, asked on `concurrency` threads by a fresh client.
fn requests(config: &VlmConfig, batches: &[(Vec<RgbImage>, Vec<String>)], cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let n = batches[0].0.len();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(config.concurrency).build()?;
    let run = Cell::new(0);
    let shape = format!("{n} requests of a 32x32 PNG and a question, {} in flight, loopback test server", config.concurrency);
    let mut t = measure(cfg, shape, None, || {
        let images = &batches[run.replace(run.get() + 1)].0;
        let vlm = Arc::new(Vlm::new(config.clone())?);
        pool.install(|| images.par_iter().map(|img| vlm.ask(img, "Describe the image.").map(drop)).collect::<anyhow::Result<()>>())?;
        Ok(Parts::new())
    })?;
    t.items_per_s = Some(n as f64 / (t.median_ms / 1e3));
    Ok(t)
}

/// A reward script (from the checkout) scoring a fresh batch per run.
fn script_reward(path: &str, models: LazyModels, batches: &[(Vec<RgbImage>, Vec<String>)], cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let n = batches[0].0.len();
    let mut scripts = ScriptSet::new(Limits::default(), Arc::new(|_: &str| {})).with_models(models);
    let reward = scripts.load_reward(Path::new(&resolve(path)))?;
    let run = Cell::new(0);
    let mut t = measure(cfg, format!("{n} images scored by {path}"), None, || {
        let (images, prompts) = &batches[run.replace(run.get() + 1)];
        reward.score(images, prompts)?;
        Ok(Parts::new())
    })?;
    t.items_per_s = Some(n as f64 / (t.median_ms / 1e3));
    Ok(t)
}
