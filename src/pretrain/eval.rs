//! Does a policy follow shapes-world prompts? Samples images for prompts drawn from the caption
//! grammar and checks them with the world's pixel-level judge (background colour from the border,
//! shape colour from the non-background pixels). Also writes labelled sample grids.

use std::path::Path;

use crate::policy::Policy;
use crate::reward::models::RewardModels;
use crate::sampler::{self, NoiseRng, SamplerConfig};
use crate::world::{judge, Prompt, ShapesWorld};

/// Fraction of samples judged correct, per attribute.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PromptFollowing {
    pub samples: usize,
    pub background: f64,
    pub shape_colour: f64,
    /// Both attributes right.
    pub both: f64,
}

/// Samples one image per prompt (in batches) and returns them as RGB images.
pub fn sample_images(
    policy: &Policy,
    prompts: &[String],
    cfg: &SamplerConfig,
    seed: u64,
    batch: usize,
) -> anyhow::Result<Vec<image::RgbImage>> {
    let mut rng = NoiseRng::new(seed);
    let mut images = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let traj = sampler::sample(policy, chunk, cfg, &mut rng)?;
        images.extend(policy.images(traj.final_sample())?);
    }
    Ok(images)
}

/// Judges `n` prompts drawn from the grammar with `prompt_seed`, sampled with `seed`.
pub fn prompt_following(
    policy: &Policy,
    world: &ShapesWorld,
    n: usize,
    cfg: &SamplerConfig,
    prompt_seed: u64,
    seed: u64,
) -> anyhow::Result<PromptFollowing> {
    let prompts = world.prompts(prompt_seed, n);
    let texts: Vec<String> = prompts.iter().map(|p| p.caption.clone()).collect();
    let images = sample_images(policy, &texts, cfg, seed, 50)?;
    Ok(judge_all(&images, &prompts))
}

/// The judge's verdicts on `images`, each against its prompt.
pub fn judge_all(images: &[image::RgbImage], prompts: &[Prompt]) -> PromptFollowing {
    let (mut bg, mut colour, mut both) = (0, 0, 0);
    for (img, p) in images.iter().zip(prompts) {
        let j = judge(img, &p.spec);
        bg += j.background_ok as usize;
        colour += j.shape_colour_ok as usize;
        both += j.passed() as usize;
    }
    let n = images.len().min(prompts.len());
    let frac = |k: usize| k as f64 / n.max(1) as f64;
    PromptFollowing { samples: n, background: frac(bg), shape_colour: frac(colour), both: frac(both) }
}

/// Mean reward-model scores of a set of samples: what the DDPO rewards measure.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RewardScores {
    /// JPEG size at quality 95 (kB), the compressibility tasks' measure.
    pub jpeg_kb: f64,
    /// CLIP cosine similarity of each image to its own prompt (the alignment reward).
    pub alignment: f64,
    /// The aesthetic head's score.
    pub aesthetic: f64,
}

/// Scores `images` (each with its prompt) with JPEG size and the CLIP / aesthetic `models`.
pub fn reward_scores(images: &[image::RgbImage], prompts: &[String], models: &RewardModels) -> anyhow::Result<RewardScores> {
    let refs: Vec<&image::RgbImage> = images.iter().collect();
    models.prefetch(&refs)?;
    let (mut jpeg, mut alignment, mut aesthetic) = (0.0, 0.0, 0.0);
    for (img, prompt) in images.iter().zip(prompts) {
        jpeg += crate::reward::jpeg::jpeg_kb(img)?;
        alignment += models.clip_similarity(img, &[prompt.as_str()])?[0];
        aesthetic += models.aesthetic(img)?;
    }
    let n = images.len().max(1) as f64;
    Ok(RewardScores { jpeg_kb: jpeg / n, alignment: alignment / n, aesthetic: aesthetic / n })
}

/// The fixed prompts shown in pretraining sample grids.
pub fn grid_prompts(world: &ShapesWorld) -> Vec<String> {
    world.prompts(1234, 16).into_iter().map(|p: Prompt| p.caption).collect()
}

/// Samples `prompts` and writes a labelled grid PNG to `path`.
pub fn write_sample_grid(
    policy: &Policy,
    prompts: &[String],
    cfg: &SamplerConfig,
    seed: u64,
    path: &Path,
) -> anyhow::Result<()> {
    let images = sample_images(policy, prompts, cfg, seed, 64)?;
    let cols = (prompts.len() as f64).sqrt().ceil() as usize;
    let grid = crate::render::labelled_grid(&images, prompts, cols, 3);
    crate::render::save_png(&grid, path)
}
