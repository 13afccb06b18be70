//! Rewards: what DDPO maximises. One small trait; each reward scores a batch of images with their
//! prompts and returns, per image, a total plus named components (logged as `reward/<name>`).
//! Rewards never see gradients. Script rewards (Rhai) plug in behind the same trait; the
//! primitives they call are declared in [`registry`], and [`Weighted`] recombines any reward's
//! components by weights set between epochs. [`vlm`] asks a vision-language model served over
//! the OpenAI-compatible API (the `vlm_ask` / `vlm_score` primitives).

pub mod aesthetic;
pub mod clip;
pub mod jpeg;
pub mod models;
pub mod pixels;
pub mod registry;
pub mod shapes_clip;
pub mod stats;
pub mod vlm;
pub mod weighted;

use std::collections::BTreeMap;

use image::RgbImage;

pub use jpeg::{JpegCompressibility, JpegIncompressibility};
pub use stats::Brightness;
pub use weighted::{Weighted, Weights};

/// The score of one image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Score {
    pub total: f64,
    /// Named parts of the total (may be empty), e.g. `jpeg_kb`.
    pub components: BTreeMap<String, f64>,
}

impl Score {
    pub fn new(total: f64) -> Self {
        Self { total, components: BTreeMap::new() }
    }

    pub fn with(mut self, name: &str, value: f64) -> Self {
        self.components.insert(name.to_string(), value);
        self
    }
}

/// A reward function over generated images. `Send + Sync` so a worker pool can share it.
pub trait Reward: Send + Sync {
    /// Short name, used in logs and metrics.
    fn name(&self) -> &str;

    /// Scores each image; `prompts[i]` produced `images[i]`.
    fn score(&self, images: &[RgbImage], prompts: &[String]) -> anyhow::Result<Vec<Score>>;
}

/// The names of the components `reward` returns, read off its score of one shapes-world image.
pub fn component_names(reward: &dyn Reward) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let sample = crate::world::ShapesWorld::default().batch(0, 1).remove(0);
    let score = reward.score(&[sample.image], &[sample.caption])?;
    Ok(score.into_iter().next().map(|s| s.components.into_keys().collect()).unwrap_or_default())
}

/// Looks up a built-in reward by name (`compressibility`, `incompressibility`).
pub fn builtin(name: &str) -> anyhow::Result<Box<dyn Reward>> {
    match name {
        "compressibility" | "jpeg-compressibility" => Ok(Box::new(JpegCompressibility)),
        "incompressibility" | "jpeg-incompressibility" => Ok(Box::new(JpegIncompressibility)),
        "brightness" => Ok(Box::new(Brightness)),
        other => anyhow::bail!(
            "unknown reward {other:?} (built-in rewards: compressibility, incompressibility, brightness)"
        ),
    }
}

/// Checks that every score is a finite number, naming the prompt and sample index otherwise.
pub fn check_finite(scores: &[Score], prompts: &[String], offset: usize) -> anyhow::Result<()> {
    for (i, s) in scores.iter().enumerate() {
        anyhow::ensure!(
            s.total.is_finite() && s.components.values().all(|v| v.is_finite()),
            "reward for sample {} (prompt {:?}) is not a finite number: total {}, components {:?}",
            offset + i,
            prompts[i],
            s.total,
            s.components
        );
    }
    Ok(())
}
