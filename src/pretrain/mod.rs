//! DDPM pretraining of the embedded default policy on an endless stream of shapes-world images:
//! noise-prediction MSE, classifier-free-guidance caption dropout, AdamW, EMA weights, periodic
//! checkpoints that resume exactly, sample grids, and a prompt-following evaluation.
//!
//! The loop reports through [`Event`]s; it never prints (the CLI draws the progress bar).

pub mod aesthetic;
pub mod clip;
pub mod eval;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, Ema};
use crate::io::{save_tensors_atomic, write_atomic};
use crate::family::unet::checkpoint::save_weights;
use crate::family::{Policy, PolicyConfig, PixelPolicy};
use crate::world::{ShapesWorld, WorldConfig};

/// Pretraining hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// Total optimiser steps.
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Linear learning-rate warm-up, in steps.
    pub warmup: usize,
    pub weight_decay: f64,
    pub ema_decay: f64,
    /// Probability of replacing a caption by the empty prompt (for classifier-free guidance).
    pub caption_dropout: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    pub sample_every: usize,
    pub policy: PolicyConfig,
    /// A model of the same architecture whose weights started this run (instead of random
    /// ones): to continue a shipped model under a new objective, e.g. v-prediction.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// A shapes CLIP whose text tower initialised the text encoder (its architecture replaces
    /// the policy's), as Stable Diffusion starts from a trained CLIP: the UNet then learns to
    /// read captions that already tell colours, shapes and places apart.
    #[serde(default)]
    pub text_encoder_from: Option<PathBuf>,
    /// Keep the text encoder as initialised (Stable Diffusion's frozen CLIP); only the UNet trains.
    #[serde(default)]
    pub freeze_text_encoder: bool,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 20_000,
            batch_size: 64,
            lr: 1e-3,
            warmup: 200,
            weight_decay: 1e-4,
            ema_decay: 0.999,
            caption_dropout: 0.1,
            grad_clip: 1.0,
            seed: 0,
            checkpoint_every: 250,
            sample_every: 1000,
            policy: PolicyConfig::shapes_default(),
            init_from: None,
            text_encoder_from: None,
            freeze_text_encoder: false,
        }
    }
}

impl PretrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::error::ensure(self.steps > 0, "steps", || "must be at least 1".into())?;
        crate::error::ensure(self.batch_size > 0, "batch_size", || "must be at least 1".into())?;
        crate::error::ensure(self.lr > 0.0 && self.lr.is_finite(), "lr", || format!("must be a positive number, got {}", self.lr))?;
        anyhow::ensure!((0.0..1.0).contains(&self.ema_decay), "EMA decay must be in [0, 1), got {}", self.ema_decay);
        anyhow::ensure!((0.0..=1.0).contains(&self.caption_dropout), "caption dropout must be in [0, 1]");
        crate::error::ensure(self.checkpoint_every > 0, "checkpoint_every", || "must be at least 1".into())?;
        self.policy.validate()
    }

    /// Learning rate at `step` (0-based): linear warm-up, constant, linear decay over the last 20%.
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = ((step + 1) as f64 / self.warmup.max(1) as f64).min(1.0);
        let decay_start = self.steps * 4 / 5;
        let decay = if step < decay_start {
            1.0
        } else {
            1.0 - 0.9 * (step - decay_start) as f64 / (self.steps - decay_start).max(1) as f64
        };
        self.lr * warm * decay
    }
}

/// What the loop reports to its caller.
#[derive(Debug, Clone)]
pub enum Event {
    Step { step: usize, loss: f64, lr: f64, grad_norm: f64 },
    Checkpoint { step: usize, path: PathBuf },
    /// A sample grid, and how much the EMA model uses its prompts.
    Samples { step: usize, path: PathBuf, conditioning: eval::ConditioningGap, attributes: Vec<(crate::world::variants::Attribute, f64)> },
}

/// Where a pretraining run keeps its files.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    /// The EMA policy (loadable by `ddpo sample --model`).
    pub fn ema(&self) -> PathBuf {
        self.dir.join("ema.safetensors")
    }
    fn samples(&self, step: usize) -> PathBuf {
        self.dir.join("samples").join(format!("step_{step:06}.png"))
    }
}

/// Saved alongside the checkpoint tensors.
#[derive(Debug, Serialize, Deserialize)]
struct RunState {
    step: usize,
    config: PretrainConfig,
}

/// A pretraining run in memory.
pub struct Pretrainer {
    pub config: PretrainConfig,
    pub policy: Policy,
    opt: AdamW,
    ema: Ema,
    world: ShapesWorld,
    pub step: usize,
    files: RunFiles,
}

impl Pretrainer {
    /// Starts a new run in `dir` (which must not hold a run already).
    pub fn create(mut config: PretrainConfig, dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let clip_text = config.text_encoder_from.as_deref().map(clip_text_tower).transpose()?;
        if let Some((text, _)) = &clip_text {
            config.policy.text_encoder = text.clone();
        }
        config.validate()?;
        let files = RunFiles { dir: dir.to_path_buf() };
        anyhow::ensure!(
            !files.state().exists(),
            "{} already holds a pretraining run: pass --resume to continue it, or choose another --out",
            dir.display()
        );
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let policy = Policy::new_random(config.policy.clone(), config.seed, device)?;
        if let Some(path) = &config.init_from {
            let weights = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| format!("cannot read the initial weights {}", path.display()))?;
            let grown = grow_from(&policy, &weights).with_context(|| format!("{} does not fit this run's architecture", path.display()))?;
            if grown > 0 {
                println!("init from {}: {grown} new tensors (new blocks start as the identity)", path.display());
            }
        }
        if let Some((_, weights)) = &clip_text {
            set_vars(&policy, weights, "text_encoder.")?;
        }
        Self::assemble(config, policy, files, 0)
    }

    /// Reopens the run in `dir` at its last checkpoint. `steps` may extend the planned length.
    pub fn resume(dir: &Path, steps: Option<usize>, device: &Device) -> anyhow::Result<Self> {
        let files = RunFiles { dir: dir.to_path_buf() };
        let text = std::fs::read_to_string(files.state())
            .with_context(|| format!("{} holds no pretraining run to resume (no state.json)", dir.display()))?;
        let mut state: RunState = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", files.state().display()))?;
        if let Some(steps) = steps {
            state.config.steps = steps;
        }
        let tensors = candle_core::safetensors::load(files.checkpoint(), device)
            .with_context(|| format!("cannot read checkpoint {}", files.checkpoint().display()))?;
        let weights: HashMap<String, Tensor> = prefixed(&tensors, "param.");
        let varmap = candle_nn::VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, t) in &weights {
                data.insert(name.clone(), candle_core::Var::from_tensor(t)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let policy = Policy::from_var_builder(state.config.policy.clone(), vb, Some(varmap), device)?;
        let mut run = Self::assemble(state.config, policy, files, state.step)?;
        run.opt.load_state(&tensors)?;
        let ema = prefixed(&tensors, "ema.");
        for (name, w) in run.ema.weights.iter_mut() {
            *w = ema.get(name).cloned().with_context(|| format!("checkpoint lacks EMA weight {name}"))?;
        }
        Ok(run)
    }

    fn assemble(config: PretrainConfig, policy: Policy, files: RunFiles, step: usize) -> anyhow::Result<Self> {
        let vars = policy.trainable_vars();
        let adam = AdamWConfig { lr: config.lr, weight_decay: config.weight_decay, ..Default::default() };
        let opt = AdamW::new(vars.clone(), adam)?;
        let ema = Ema::new(opt.vars(), config.ema_decay)?;
        let size = config.policy.image_size as u32;
        let world = ShapesWorld::new(WorldConfig { size, ..Default::default() })?;
        Ok(Self { config, policy, opt, ema, world, step, files })
    }

    /// Runs until `config.steps`, checkpointing and sampling on schedule; `stop` is polled each
    /// step (e.g. set by Ctrl-C) and leads to a final checkpoint.
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event), stop: &dyn Fn() -> bool) -> anyhow::Result<()> {
        while self.step < self.config.steps && !stop() {
            let (loss, grad_norm) = self.train_step()?;
            on_event(Event::Step { step: self.step, loss, lr: self.config.lr_at(self.step - 1), grad_norm });
            if self.step % self.config.checkpoint_every == 0 || self.step == self.config.steps {
                self.save_checkpoint()?;
                on_event(Event::Checkpoint { step: self.step, path: self.files.dir.clone() });
            }
            if self.config.sample_every > 0 && self.step % self.config.sample_every == 0 {
                let path = self.files.samples(self.step);
                let family = self.ema_family()?;
                self.write_samples(family.as_ref(), &path)?;
                let conditioning = eval::conditioning_gap(family.as_ref(), &self.world, 64)?;
                let attributes = eval::attribute_gaps(family.as_ref(), &self.world, 128)?;
                on_event(Event::Samples { step: self.step, path, conditioning, attributes });
            }
        }
        if self.step % self.config.checkpoint_every != 0 {
            self.save_checkpoint()?;
            on_event(Event::Checkpoint { step: self.step, path: self.files.dir.clone() });
        }
        Ok(())
    }

    /// One DDPM step. All randomness derives from (seed, step), so a resumed run sees exactly the
    /// data and noise the uninterrupted one would have.
    pub fn train_step(&mut self) -> anyhow::Result<(f64, f64)> {
        let cfg = &self.config;
        let device = self.policy.device.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.step as u64);
        let batch = self.world.batch(rng.random(), cfg.batch_size);
        let images: Vec<_> = batch.iter().map(|s| s.image.clone()).collect();
        let x0 = crate::render::images_to_tensor(&images, &device)?;
        let captions: Vec<String> = batch
            .iter()
            .map(|s| if rng.random_bool(cfg.caption_dropout) { String::new() } else { s.caption.clone() })
            .collect();
        let (x_t, tt, target) = match self.policy.config.flow_shift {
            None => {
                let t: Vec<usize> = (0..cfg.batch_size).map(|_| rng.random_range(0..self.policy.schedule.num_train_timesteps())).collect();
                let mut noise_rng = crate::sampler::NoiseRng::new(rng.random());
                let noise = noise_rng.randn(x0.shape(), &device)?;
                let x_t = self.policy.schedule.add_noise(&x0, &noise, &t)?;
                let target = self.policy.schedule.training_target(&x0, &noise, &t)?;
                (x_t, t.iter().map(|&v| v as f32).collect::<Vec<_>>(), target)
            }
            Some(shift) => flow_inputs(&x0, shift, &mut rng)?,
        };
        let tt = Tensor::from_vec(tt, cfg.batch_size, &device)?;
        let policy = &self.policy;
        let shards = crate::kernels::shards::sharded_backward(cfg.batch_size, &device, |r| -> candle_core::Result<_> {
            let rows = |v: &Tensor| v.narrow(0, r.start, r.len());
            let ctx = policy.encode_prompts(&captions[r.clone()])?;
            // Frozen: no gradient reaches the text encoder, so AdamW leaves it as it is.
            let ctx = if cfg.freeze_text_encoder { ctx.detach() } else { ctx };
            let loss = (policy.unet.forward(&rows(&x_t)?, &rows(&tt)?, &ctx)? - rows(&target)?)?.sqr()?.mean_all()?;
            let value = loss.to_scalar::<f32>()? as f64;
            Ok((loss, value))
        })?;
        let loss_value: f64 = shards.iter().map(|s| s.share * s.extra).sum();
        anyhow::ensure!(loss_value.is_finite(), "pretraining loss became {loss_value} at step {}", self.step);
        let mut grads = self.opt.collect_sum(shards.iter().map(|s| &s.grads))?;
        let grad_norm = clip_grad_norm(&mut grads, cfg.grad_clip)?;
        self.opt.set_lr(cfg.lr_at(self.step));
        self.opt.step(&grads)?;
        self.ema.update(self.opt.vars(), self.step)?;
        self.step += 1;
        Ok((loss_value, grad_norm))
    }

    /// Writes `checkpoint.safetensors` (weights, EMA, optimiser), `ema.safetensors` + `.json`
    /// (the EMA policy) and `state.json`, each atomically; the state goes last so that it never
    /// points at a newer step than the tensors hold.
    pub fn save_checkpoint(&self) -> anyhow::Result<()> {
        let mut tensors = self.opt.state_tensors()?;
        for (name, var) in self.opt.vars() {
            tensors.insert(format!("param.{name}"), var.as_tensor().clone());
        }
        for (name, w) in &self.ema.weights {
            tensors.insert(format!("ema.{name}"), w.clone());
        }
        save_tensors_atomic(&tensors, &self.files.checkpoint())?;
        save_weights(&self.config.policy, &self.ema.weights, &self.files.ema())?;
        let state = RunState { step: self.step, config: self.config.clone() };
        write_atomic(&self.files.state(), serde_json::to_string_pretty(&state)?.as_bytes())
    }

    /// Writes the EMA policy (weights + config) to `path`, e.g. `models/shapes-unet.safetensors`.
    pub fn export(&self, path: &Path) -> anyhow::Result<()> {
        save_weights(&self.config.policy, &self.ema.weights, path)
    }

    /// A frozen policy with the EMA weights (what gets shipped).
    pub fn ema_policy(&self) -> anyhow::Result<Policy> {
        let map: HashMap<String, Tensor> = self.ema.weights.iter().cloned().collect();
        let vb = VarBuilder::from_tensors(map, DType::F32, &self.policy.device);
        Policy::from_var_builder(self.config.policy.clone(), vb, None, &self.policy.device)
    }

    /// The EMA policy as its family (a flow model where the config says so).
    pub fn ema_family(&self) -> anyhow::Result<Box<dyn crate::family::Family>> {
        let policy = self.ema_policy()?;
        Ok(if policy.config.flow_shift.is_some() { Box::new(crate::family::flow::FlowPolicy::new(policy)?) } else { Box::new(PixelPolicy(policy)) })
    }

    /// A labelled grid of `family`'s samples for a fixed set of prompts.
    pub fn write_samples(&self, family: &dyn crate::family::Family, path: &Path) -> anyhow::Result<()> {
        // Created here, not at `create`: the folder is not versioned, so a resumed run from a
        // fresh clone does not have it.
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
        }
        crate::sampler::write_sample_grid(family, &eval::grid_prompts(&self.world), &family.eval_sampler(), self.config.seed, path)
    }
}

/// The text tower of the shapes CLIP at `weights`: its config and its tensors, named as the
/// policy's text encoder names them.
fn clip_text_tower(weights: &Path) -> anyhow::Result<(crate::model::TextConfig, HashMap<String, Tensor>)> {
    let config = crate::reward::shapes_clip::load_config(weights)?;
    let tensors = candle_core::safetensors::load(weights, &Device::Cpu)
        .with_context(|| format!("cannot read the shapes CLIP weights {}", weights.display()))?;
    let text: HashMap<String, Tensor> =
        tensors.into_iter().filter(|(name, _)| name.starts_with("text_model.")).map(|(name, t)| (format!("text_encoder.{name}"), t)).collect();
    anyhow::ensure!(!text.is_empty(), "{} has no text tower (no text_model.* tensors): pass a shapes CLIP such as models/shapes-clip.safetensors", weights.display());
    Ok((config.text, text))
}

/// Overwrites every variable of `policy` whose name starts with `prefix` with its tensor in
/// `weights`, which must hold exactly those, in the same shapes.
fn set_vars(policy: &Policy, weights: &HashMap<String, Tensor>, prefix: &str) -> anyhow::Result<()> {
    let vars: Vec<_> = policy.trainable_vars().into_iter().filter(|(name, _)| name.starts_with(prefix)).collect();
    anyhow::ensure!(vars.len() == weights.len(), "{} tensors given for the policy's {} ({prefix}*)", weights.len(), vars.len());
    for (name, var) in vars {
        let w = weights.get(&name).with_context(|| format!("no tensor {name}"))?;
        anyhow::ensure!(w.shape() == var.shape(), "{name}: shape {:?} given, the policy's is {:?}", w.dims(), var.dims());
        var.set(&w.to_device(var.device())?)?;
    }
    Ok(())
}

/// Starts `policy` from `weights` of the same or a smaller architecture (one that lacks some of
/// its attention blocks): every given tensor must fit a parameter of the policy. Parameters the
/// file lacks keep their random start, except each new transformer block's output projection
/// and a new pooled-caption embedding's last layer norm, which are zeroed so the new module adds
/// nothing yet and the grown model computes what the old one did (ControlNet's zero
/// convolutions). Returns how many parameters the file lacked.
fn grow_from(policy: &Policy, weights: &HashMap<String, Tensor>) -> anyhow::Result<usize> {
    let vars: HashMap<String, candle_core::Var> = policy.trainable_vars().into_iter().collect();
    if let Some(stray) = weights.keys().find(|name| !vars.contains_key(*name)) {
        anyhow::bail!("it has a tensor {stray} that the policy lacks (another architecture, or a LoRA adapter?)");
    }
    let mut lacked = 0;
    for (name, var) in &vars {
        match weights.get(name) {
            Some(w) => {
                anyhow::ensure!(w.shape() == var.shape(), "{name}: shape {:?} given, the policy's is {:?}", w.dims(), var.dims());
                var.set(&w.to_device(var.device())?)?;
            }
            None => {
                lacked += 1;
                let new_attention = name.contains(".attentions.") && name.contains(".proj_out.");
                if new_attention || name.starts_with("unet.add_embedding.norm2.") {
                    var.set(&var.zeros_like()?)?;
                }
            }
        }
    }
    anyhow::ensure!(lacked < vars.len(), "it shares no tensor with the policy");
    Ok(lacked)
}

fn prefixed(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
        .collect()
}

/// A flow-matching batch: x_s = (1 - s) x0 + s eps at a shifted uniform s per image, the UNet's
/// time input 1000 s, and the velocity target eps - x0.
fn flow_inputs(x0: &Tensor, shift: f64, rng: &mut ChaCha8Rng) -> candle_core::Result<(Tensor, Vec<f32>, Tensor)> {
    let n = x0.dim(0)?;
    let s: Vec<f32> = (0..n).map(|_| crate::family::flow::shifted(rng.random::<f64>(), shift) as f32).collect();
    let noise = crate::sampler::NoiseRng::new(rng.random()).randn(x0.shape(), x0.device())?;
    let s_col = Tensor::from_vec(s.clone(), (n, 1, 1, 1), x0.device())?;
    let x_s = (x0.broadcast_mul(&s_col.affine(-1.0, 1.0)?)? + noise.broadcast_mul(&s_col)?)?;
    let target = (noise - x0)?;
    Ok((x_s, s.iter().map(|v| 1000.0 * v).collect(), target))
}
