//! `ddpo pretrain aesthetic`: fits an aesthetic head of the LAION predictor's family
//! ([`AestheticMlp`], input width = the small CLIP's embedding width) on the small CLIP's
//! L2-normalised image embeddings to predict the shapes world's procedural composition score
//! ([`crate::world::composition`]). The CLIP is frozen, so its embeddings are computed once;
//! training on them takes seconds. Held-out images come from [`super::clip::EVAL_SEED`].
//!
//! As in LAION's training script the loss is MSE; the released MLP's dropouts are left out
//! (the data is endless, so there is little to regularise).

use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarMap;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, AdamWConfig};
use crate::family::unet::init::seeded_var_builder;
use crate::io::{save_tensors_atomic, write_atomic};
pub use crate::reward::aesthetic::{head_config_path, load_head};
use crate::reward::aesthetic::AestheticMlp;
use crate::reward::shapes_clip::ShapesClip;
use crate::world::{composition, ShapesWorld, WorldConfig};

/// Hyper-parameters of the aesthetic fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AestheticTrainConfig {
    /// Training images (embedded once).
    pub train_images: usize,
    /// Held-out images for the reported correlation.
    pub eval_images: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

impl Default for AestheticTrainConfig {
    fn default() -> Self {
        Self { train_images: 8192, eval_images: 1024, steps: 3000, batch_size: 256, lr: 1e-3, seed: 0 }
    }
}

/// What sits beside the shipped head as `.json`: its input width and what it was fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AestheticHeadConfig {
    pub input_dim: usize,
    /// The CLIP whose embeddings it reads (file name, relative to the head's folder).
    pub clip: String,
    /// The target it predicts.
    pub target: String,
    pub train: AestheticTrainConfig,
}

/// Held-out quality of the fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AestheticReport {
    pub train_pearson: f64,
    pub eval_pearson: f64,
    pub eval_rmse: f64,
    /// Standard deviation of the target over the held-out images (RMSE's yardstick).
    pub eval_target_std: f64,
}

/// Embeddings `(N, D)` of `n` shapes-world images from `seed`, and their composition scores.
pub fn embed_scenes(clip: &ShapesClip, seed: u64, n: usize) -> anyhow::Result<(Tensor, Vec<f32>)> {
    let world = ShapesWorld::new(WorldConfig { size: clip.config().image_size as u32, ..Default::default() })?;
    let samples = world.batch(seed, n);
    let mut parts = Vec::new();
    for chunk in samples.chunks(256) {
        let imgs: Vec<_> = chunk.iter().map(|s| &s.image).collect();
        parts.push(clip.image_embeddings(&imgs)?);
    }
    let scores = samples.iter().map(|s| composition(&s.scene).total as f32).collect();
    Ok((Tensor::cat(&parts, 0)?, scores))
}

/// Fits a head on `clip`'s embeddings; returns it, its weights and the held-out report.
pub fn train_head(clip: &ShapesClip, cfg: &AestheticTrainConfig, on_step: &mut dyn FnMut(usize, f64)) -> anyhow::Result<(AestheticMlp, VarMap, AestheticReport)> {
    anyhow::ensure!(cfg.train_images >= cfg.batch_size && cfg.batch_size > 0, "need at least one batch of training images");
    anyhow::ensure!(cfg.eval_images > 1, "need at least two held-out images");
    let device = clip.device().clone();
    let (x, y) = embed_scenes(clip, cfg.seed.wrapping_add(1) ^ 0xAE57, cfg.train_images)?;
    let (xe, ye) = embed_scenes(clip, super::clip::EVAL_SEED, cfg.eval_images)?;
    let varmap = VarMap::new();
    let mlp = AestheticMlp::new(clip.config().embed_dim, seeded_var_builder(&varmap, cfg.seed, &device))?;
    let vars: Vec<_> = varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    let mut opt = AdamW::new(vars, AdamWConfig { lr: cfg.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<u32> = (0..cfg.train_images as u32).collect();
    let yt = Tensor::new(y.as_slice(), &device)?;
    let per_epoch = cfg.train_images / cfg.batch_size;
    for step in 0..cfg.steps {
        if step % per_epoch == 0 {
            order.shuffle(&mut rng);
        }
        let start = (step % per_epoch) * cfg.batch_size;
        let idx = Tensor::new(&order[start..start + cfg.batch_size], &device)?;
        let pred = mlp.score(&x.index_select(&idx, 0)?)?;
        let loss = (pred - yt.index_select(&idx, 0)?)?.sqr()?.mean_all()?;
        let value = loss.to_scalar::<f32>()? as f64;
        anyhow::ensure!(value.is_finite(), "aesthetic loss became {value} at step {step}");
        // Cosine decay keeps the last steps from bouncing around the optimum.
        let t = step as f64 / cfg.steps as f64;
        opt.set_lr(cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()));
        opt.step(&opt.collect(&loss.backward()?))?;
        on_step(step, value);
    }
    let train_pred = mlp.score(&x)?.to_vec1::<f32>()?;
    let eval_pred = mlp.score(&xe)?.to_vec1::<f32>()?;
    let mean = ye.iter().map(|&v| v as f64).sum::<f64>() / ye.len() as f64;
    let report = AestheticReport {
        train_pearson: pearson(&train_pred, &y),
        eval_pearson: pearson(&eval_pred, &ye),
        eval_rmse: (eval_pred.iter().zip(&ye).map(|(p, t)| ((p - t) as f64).powi(2)).sum::<f64>() / ye.len() as f64).sqrt(),
        eval_target_std: (ye.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / ye.len() as f64).sqrt(),
    };
    Ok((mlp, varmap, report))
}

/// Writes the head (upstream tensor names `layers.*`) and its `.json` config, atomically.
pub fn save_head(varmap: &VarMap, config: &AestheticHeadConfig, path: &Path) -> anyhow::Result<()> {
    let tensors = varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    save_tensors_atomic(&tensors, path)?;
    write_atomic(&head_config_path(path), serde_json::to_string_pretty(config)?.as_bytes())
}

/// Pearson correlation of two equally long series.
pub fn pearson(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let ma = a.iter().map(|&v| v as f64).sum::<f64>() / n;
    let mb = b.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt().max(1e-12)
}
