//! `ddpo pretrain clip`: contrastive training of the small shapes-world CLIP
//! ([`crate::reward::shapes_clip`]) on an endless stream of shapes-world images and captions, with
//! resumable checkpoints, and its zero-shot evaluation on held-out images.
//!
//! Every image also competes against hard-negative captions (the true caption with one
//! attribute changed, [`crate::world::variants`]: one in a random attribute, and all six with
//! another shape), so the model must read
//! every word rather than the easiest one. The evaluation images come from a seed no training
//! batch uses ([`EVAL_SEED`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::io::{save_tensors_atomic, write_atomic};
use crate::family::unet::init::seeded_var_builder;
use crate::reward::shapes_clip::{ShapesClip, ShapesClipConfig};
use crate::world::variants::{random_variant, variants, Attribute};
use crate::world::{ShapesWorld, WorldConfig, WorldSample};

/// Seed of the held-out evaluation images (training batches draw their seeds from the run seed).
pub const EVAL_SEED: u64 = 0x5EED_C11B;

/// Hyper-parameters of the contrastive run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Add one-attribute-off captions per image as extra negatives: one in a random attribute,
    /// and the caption with each other shape (the attribute in-batch negatives teach least: a
    /// random batch almost always differs in colour first).
    pub hard_negatives: bool,
    pub seed: u64,
    pub checkpoint_every: usize,
    pub model: ShapesClipConfig,
}

impl Default for ClipTrainConfig {
    fn default() -> Self {
        Self {
            steps: 900,
            batch_size: 96,
            lr: 2e-3,
            warmup: 100,
            weight_decay: 1e-4,
            grad_clip: 1.0,
            hard_negatives: true,
            seed: 0,
            checkpoint_every: 100,
            model: ShapesClipConfig::shapes_default(),
        }
    }
}

impl ClipTrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::error::ensure(self.steps > 0, "steps", || "must be at least 1".into())?;
        crate::error::ensure(self.batch_size > 1, "batch_size", || "must be at least 2 (contrastive pairs need negatives)".into())?;
        crate::error::ensure(self.lr > 0.0 && self.lr.is_finite(), "lr", || format!("must be a positive number, got {}", self.lr))?;
        crate::error::ensure(self.checkpoint_every > 0, "checkpoint_every", || "must be at least 1".into())?;
        self.model.validate()
    }

    /// Linear warm-up, then cosine decay to 5% of `lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let t = (step - self.warmup) as f64 / (self.steps.saturating_sub(self.warmup)).max(1) as f64;
        self.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos()))
    }
}

/// What the loop reports.
#[derive(Debug, Clone)]
pub enum ClipEvent {
    Step { step: usize, loss: f64, lr: f64, temperature: f64 },
    Checkpoint { step: usize, path: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    step: usize,
    config: ClipTrainConfig,
}

/// A contrastive run in memory, checkpointed to `dir/{state.json, checkpoint.safetensors}`
/// with the current weights in `dir/clip.safetensors` (+ `.json`).
pub struct ClipTrainer {
    pub config: ClipTrainConfig,
    pub model: ShapesClip,
    opt: AdamW,
    world: ShapesWorld,
    pub step: usize,
    dir: PathBuf,
}

impl ClipTrainer {
    /// Starts a new run in `dir` (which must not hold one).
    pub fn create(config: ClipTrainConfig, dir: &Path, device: &Device) -> anyhow::Result<Self> {
        config.validate()?;
        anyhow::ensure!(
            !dir.join("state.json").exists(),
            "{} already holds a CLIP run: pass --resume to continue it, or choose another --out",
            dir.display()
        );
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let varmap = VarMap::new();
        let model = ShapesClip::new(&config.model, seeded_var_builder(&varmap, config.seed, device))?;
        Self::assemble(config, model, &varmap, dir, 0)
    }

    /// Reopens the run in `dir` at its last checkpoint; `steps` may change the planned length.
    pub fn resume(dir: &Path, steps: Option<usize>, device: &Device) -> anyhow::Result<Self> {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("{} holds no CLIP run to resume (no state.json)", dir.display()))?;
        let mut state: RunState = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
        if let Some(steps) = steps {
            state.config.steps = steps;
        }
        let ckpt = dir.join("checkpoint.safetensors");
        let tensors = candle_core::safetensors::load(&ckpt, device).with_context(|| format!("cannot read checkpoint {}", ckpt.display()))?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, t) in &tensors {
                if let Some(n) = name.strip_prefix("param.") {
                    data.insert(n.to_string(), candle_core::Var::from_tensor(t)?);
                }
            }
        }
        let model = ShapesClip::new(&state.config.model, VarBuilder::from_varmap(&varmap, DType::F32, device))
            .with_context(|| format!("checkpoint {} does not match its config", ckpt.display()))?;
        let mut run = Self::assemble(state.config, model, &varmap, dir, state.step)?;
        run.opt.load_state(&tensors)?;
        Ok(run)
    }

    fn assemble(config: ClipTrainConfig, model: ShapesClip, varmap: &VarMap, dir: &Path, step: usize) -> anyhow::Result<Self> {
        let vars: Vec<_> = varmap.data().lock().expect("varmap lock").iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let adam = AdamWConfig { lr: config.lr, weight_decay: config.weight_decay, ..Default::default() };
        let opt = AdamW::new(vars, adam)?;
        let world = ShapesWorld::new(WorldConfig { size: config.model.image_size as u32, ..Default::default() })?;
        Ok(Self { config, model, opt, world, step, dir: dir.to_path_buf() })
    }

    /// The current weights by name.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.opt.vars().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }

    /// Runs to `config.steps`, checkpointing on schedule and at the end; `stop` is polled each step.
    pub fn run(&mut self, on_event: &mut dyn FnMut(ClipEvent), stop: &dyn Fn() -> bool) -> anyhow::Result<()> {
        while self.step < self.config.steps && !stop() {
            let loss = self.train_step()?;
            let temperature = 1.0 / self.model.logit_scale()?.exp()?.to_scalar::<f32>()? as f64;
            on_event(ClipEvent::Step { step: self.step, loss, lr: self.config.lr_at(self.step - 1), temperature });
            if self.step % self.config.checkpoint_every == 0 {
                self.save_checkpoint()?;
                on_event(ClipEvent::Checkpoint { step: self.step, path: self.dir.clone() });
            }
        }
        if self.step % self.config.checkpoint_every != 0 {
            self.save_checkpoint()?;
            on_event(ClipEvent::Checkpoint { step: self.step, path: self.dir.clone() });
        }
        Ok(())
    }

    /// One batch: data and negatives derive from (seed, step), so a resumed run sees what the
    /// uninterrupted one would have.
    pub fn train_step(&mut self) -> anyhow::Result<f64> {
        let cfg = &self.config;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (self.step as u64 + 1));
        let batch = self.world.batch(rng.random(), cfg.batch_size);
        let negatives: Vec<String> = if cfg.hard_negatives {
            batch
                .iter()
                .flat_map(|s| {
                    let shapes = variants(&s.spec, Attribute::Shape).into_iter().map(|v| v.caption());
                    std::iter::once(random_variant(&s.spec, &mut rng).caption()).chain(shapes).collect::<Vec<_>>()
                })
                .collect()
        } else {
            Vec::new()
        };
        let images: Vec<_> = batch.iter().map(|s| &s.image).collect();
        let captions: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
        let negs: Vec<&str> = negatives.iter().map(String::as_str).collect();
        let loss = self.model.contrastive_loss(&images, &captions, &negs)?;
        let value = loss.to_scalar::<f32>()? as f64;
        anyhow::ensure!(value.is_finite(), "CLIP loss became {value} at step {}", self.step);
        let mut grads = self.opt.collect(&loss.backward()?);
        clip_grad_norm(&mut grads, cfg.grad_clip)?;
        self.opt.set_lr(cfg.lr_at(self.step));
        self.opt.step(&grads)?;
        self.step += 1;
        Ok(value)
    }

    /// Writes `checkpoint.safetensors` (weights + optimiser), `clip.safetensors` + `.json` and
    /// `state.json` (last, so it never points past the tensors), each atomically.
    pub fn save_checkpoint(&self) -> anyhow::Result<()> {
        let weights = self.weights();
        let mut tensors = self.opt.state_tensors()?;
        for (name, t) in &weights {
            tensors.insert(format!("param.{name}"), t.clone());
        }
        save_tensors_atomic(&tensors, &self.dir.join("checkpoint.safetensors"))?;
        self.export(&self.dir.join("clip.safetensors"))?;
        let state = RunState { step: self.step, config: self.config.clone() };
        write_atomic(&self.dir.join("state.json"), serde_json::to_string_pretty(&state)?.as_bytes())
    }

    /// Writes the weights and config to `path` (e.g. `models/shapes-clip.safetensors`).
    pub fn export(&self, path: &Path) -> anyhow::Result<()> {
        ShapesClip::save(&self.config.model, &self.weights(), path)
    }
}

/// Zero-shot accuracy on one attribute.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    /// Mean number of candidate captions per question (1 true + its variants).
    pub mean_candidates: f64,
    pub accuracy: f64,
}

/// Per-attribute zero-shot accuracies (`count` only over single-group captions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZeroShot {
    pub images: usize,
    pub colour: Accuracy,
    pub shape: Accuracy,
    pub count: Accuracy,
    pub background: Accuracy,
}

/// `n` held-out evaluation images at the model's size.
pub fn eval_samples(model: &ShapesClip, n: usize) -> anyhow::Result<Vec<WorldSample>> {
    let world = ShapesWorld::new(WorldConfig { size: model.config().image_size as u32, ..Default::default() })?;
    Ok(world.batch(EVAL_SEED, n))
}

/// For every image and attribute: does the true caption score highest among it and all its
/// one-attribute variants?
pub fn zero_shot(model: &ShapesClip, samples: &[WorldSample]) -> anyhow::Result<ZeroShot> {
    anyhow::ensure!(!samples.is_empty(), "zero-shot evaluation needs at least one image");
    let mut image_emb = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(256) {
        let imgs: Vec<_> = chunk.iter().map(|s| &s.image).collect();
        image_emb.extend(model.image_embeddings(&imgs)?.to_vec2::<f32>()?);
    }
    // Every question's captions, embedded once each.
    let questions: Vec<(usize, Attribute, Vec<String>)> = samples
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            Attribute::ALL.into_iter().filter_map(move |a| {
                let vs = variants(&s.spec, a);
                (!vs.is_empty()).then(|| (i, a, std::iter::once(s.caption.clone()).chain(vs.iter().map(|v| v.caption())).collect()))
            })
        })
        .collect();
    let mut unique: Vec<&str> = questions.iter().flat_map(|q| q.2.iter().map(String::as_str)).collect();
    unique.sort_unstable();
    unique.dedup();
    let mut text_emb: HashMap<&str, Vec<f32>> = HashMap::with_capacity(unique.len());
    for chunk in unique.chunks(512) {
        for (t, e) in chunk.iter().zip(model.text_embeddings(chunk)?.to_vec2::<f32>()?) {
            text_emb.insert(t, e);
        }
    }
    let mut acc: HashMap<Attribute, (usize, usize, usize)> = HashMap::new();
    for (i, attribute, captions) in &questions {
        let scores: Vec<f32> = captions.iter().map(|c| dot(&image_emb[*i], &text_emb[c.as_str()])).collect();
        let best = (1..scores.len()).all(|j| scores[0] > scores[j]);
        let e = acc.entry(*attribute).or_default();
        e.0 += best as usize;
        e.1 += 1;
        e.2 += captions.len();
    }
    let get = |a: Attribute| {
        let (correct, total, cands) = acc.get(&a).copied().unwrap_or_default();
        Accuracy {
            correct,
            total,
            mean_candidates: cands as f64 / total.max(1) as f64,
            accuracy: correct as f64 / total.max(1) as f64,
        }
    };
    Ok(ZeroShot {
        images: samples.len(),
        colour: get(Attribute::Colour),
        shape: get(Attribute::Shape),
        count: get(Attribute::Count),
        background: get(Attribute::Background),
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
