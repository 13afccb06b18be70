//! The benchmark workloads themselves: inputs built once per workload from fixed seeds, then
//! one closure per timed run. Sizes come from [`Sizes`] (the default workloads or `--quick`).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{Device, Tensor, Var};

use super::{measure, BenchConfig, Parts, Timing};
use crate::ddpo::{FixedPrompts, TrainConfig, Trainer};
use crate::kernels;
use crate::model::transformer::{SpatialTransformer, SpatialTransformerConfig};
use crate::optim::{AdamW, AdamWConfig};
use crate::model::LoraConfig;
use crate::family::sd::{Finetune, LatentPolicy};
use crate::family::unet::init::seeded_var_builder;
use crate::family::{PixelPolicy, Policy, PolicyConfig};
use crate::reward::JpegCompressibility;
use crate::family::{NoiseRng, SamplerConfig};
use crate::sampler;

/// The prompt every UNet workload is conditioned on.
const PROMPT: &str = "a red circle on a blue background";

/// Batch sizes and shapes of every workload.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Conv input (N, C, H, W) and output channels; 3x3 kernel, stride 1, padding 1.
    pub conv: (usize, usize, usize, usize, usize),
    /// GroupNorm(+SiLU) input (N, C, H, W).
    pub group_norm: (usize, usize, usize, usize),
    /// Batch of the attention block at the UNet's 8x8 level.
    pub attention_batch: usize,
    pub unet_batch: usize,
    pub train_batch: usize,
    /// Images and DDIM steps of one sampling.
    pub ddim: (usize, usize),
    /// Samples and DDIM steps of one DDPO epoch.
    pub epoch: (usize, usize),
    /// Samples, sample batch, train batch and DDIM steps of one DDPO epoch on tiny-sd.
    pub sd_epoch: (usize, usize, usize, usize),
    /// Images embedded per run by the small shapes CLIP and by a ViT-B/32-sized CLIP.
    pub clip: (usize, usize),
    /// Images per run of the VLM workloads and the requests in flight at once.
    pub vlm: (usize, usize),
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            conv: (16, 64, 32, 32, 64),
            group_norm: (64, 32, 32, 32),
            attention_batch: 64,
            unet_batch: 32,
            train_batch: 64,
            ddim: (64, 20),
            epoch: (32, 10),
            // The reference timing of tests/fixtures/tiny-sd/README.md.
            sd_epoch: (8, 4, 2, 20),
            clip: (256, 8),
            vlm: (64, 8),
        }
    }
}

impl Sizes {
    /// Tiny sizes for a smoke test: every workload in a few seconds.
    pub fn quick() -> Self {
        Self {
            conv: (2, 16, 16, 16, 16),
            group_norm: (2, 32, 8, 8),
            attention_batch: 2,
            unet_batch: 2,
            train_batch: 2,
            ddim: (2, 2),
            epoch: (4, 2),
            sd_epoch: (4, 2, 2, 2),
            clip: (4, 1),
            vlm: (4, 2),
        }
    }
}

/// Runs one workload group, returning its timings by JSON key.
pub fn run_group(name: &str, sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Vec<(String, Timing)>> {
    let keyed = |key: &str, t: anyhow::Result<Timing>| -> anyhow::Result<(String, Timing)> {
        Ok((key.to_string(), t.with_context(|| format!("bench workload {key}"))?))
    };
    Ok(match name {
        "conv" => vec![keyed("conv_fwd", conv(sizes, cfg, false))?, keyed("conv_fwd_bwd", conv(sizes, cfg, true))?],
        "group_norm" => vec![keyed("group_norm_silu_fwd_bwd", group_norm(sizes, cfg))?],
        "attention" => vec![keyed("attention_fwd_bwd", attention(sizes, cfg))?],
        "unet_fwd" => vec![keyed("unet_fwd", unet_fwd(sizes, cfg))?],
        "train_step" => vec![keyed("train_step", train_step(sizes, cfg))?],
        "ddim" => vec![keyed("ddim_sample", ddim(sizes, cfg))?],
        "ddpo_epoch" => vec![keyed("ddpo_epoch", ddpo_epoch(sizes, cfg))?],
        "sd_epoch_lora" => vec![keyed("sd_epoch_lora", sd_epoch(sizes, cfg, true))?],
        "sd_epoch_full" => vec![keyed("sd_epoch_full", sd_epoch(sizes, cfg, false))?],
        "clip" => vec![keyed("clip_small_embed", clip_small(sizes, cfg))?, keyed("clip_vit_b32_embed", clip_vit_b32(sizes, cfg))?],
        "vlm" => super::vlm::group(sizes, cfg)?.into_iter().map(|(key, t)| keyed(key, t)).collect::<anyhow::Result<_>>()?,
        other => anyhow::bail!("unknown workload {other:?}"),
    })
}

/// Standard-normal tensor of `shape` scaled by `scale`, from a fixed seed.
fn randn(seed: u64, shape: &[usize], scale: f64) -> anyhow::Result<Tensor> {
    Ok((NoiseRng::new(seed).randn(shape, &Device::Cpu)? * scale)?)
}

fn default_policy() -> anyhow::Result<Policy> {
    Policy::new_random(PolicyConfig::shapes_default(), 0, &Device::Cpu).context("building the default policy")
}

/// `kernels::conv2d` with a per-channel bias; forward only, or forward + backward of the sum.
fn conv(sizes: &Sizes, cfg: &BenchConfig, backward: bool) -> anyhow::Result<Timing> {
    let (n, c, h, w, o) = sizes.conv;
    let x = Var::from_tensor(&randn(1, &[n, c, h, w], 1.0)?)?;
    let wt = Var::from_tensor(&randn(2, &[o, c, 3, 3], 0.05)?)?;
    let b = Var::from_tensor(&randn(3, &[o], 0.05)?)?;
    let fwd_flops = 2.0 * (n * o * h * w * c * 9) as f64;
    let flops = if backward { 3.0 * fwd_flops } else { fwd_flops };
    let shape = format!("x {n}x{c}x{h}x{w}, {o} out, 3x3 pad 1, bias");
    measure(cfg, shape, Some(flops), || {
        let y = kernels::conv2d(&x, &wt, Some(&b), 1, 1)?;
        if backward {
            y.sum_all()?.backward()?;
        }
        Ok(Parts::new())
    })
}

/// `kernels::group_norm` with the fused SiLU, forward + backward of the sum.
fn group_norm(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let (n, c, h, w) = sizes.group_norm;
    let groups = PolicyConfig::shapes_default().unet.norm_num_groups;
    let x = Var::from_tensor(&randn(1, &[n, c, h, w], 1.0)?)?;
    let weight = Var::from_tensor(&(randn(2, &[c], 0.1)? + 1.0)?)?;
    let bias = Var::from_tensor(&randn(3, &[c], 0.1)?)?;
    let shape = format!("x {n}x{c}x{h}x{w}, {groups} groups, + SiLU");
    measure(cfg, shape, None, || {
        kernels::group_norm(&x, &weight, &bias, groups, 1e-5, true)?.sum_all()?.backward()?;
        Ok(Parts::new())
    })
}

/// One `SpatialTransformer` (the default's 8x8 level) forward + backward of the sum.
fn attention(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let unet = PolicyConfig::shapes_default().unet;
    let c = *unet.block_out_channels.last().context("the default UNet has no blocks")?;
    let heads = unet.attention_head_dim.at(unet.block_out_channels.len() - 1);
    let (b, side, ctx_len, d) = (sizes.attention_batch, 8, 16, unet.cross_attention_dim);
    let varmap = candle_nn::VarMap::new();
    let st_cfg = SpatialTransformerConfig {
        channels: c,
        heads,
        context_dim: d,
        groups: unet.norm_num_groups,
        use_linear_projection: unet.use_linear_projection,
    };
    let block = SpatialTransformer::new(st_cfg, seeded_var_builder(&varmap, 0, &Device::Cpu), None)?;
    let x = Var::from_tensor(&randn(1, &[b, c, side, side], 1.0)?)?;
    let ctx = randn(2, &[b, ctx_len, d], 1.0)?;
    let shape = format!("x {b}x{c}x{side}x{side}, {heads} heads, context {b}x{ctx_len}x{d}");
    let flops = 3.0 * attention_fwd_flops(b, side * side, c, ctx_len, d);
    measure(cfg, shape, Some(flops), || {
        block.forward(&x, &ctx)?.sum_all()?.backward()?;
        Ok(Parts::new())
    })
}

/// Matmul FLOPs of one spatial transformer forward: batch `b`, `l` pixels of `c` channels,
/// context of `s` tokens of width `d` (projections, both attentions, the GEGLU feed-forward).
fn attention_fwd_flops(b: usize, l: usize, c: usize, s: usize, d: usize) -> f64 {
    let mm = |m: usize, k: usize, n: usize| 2.0 * (b * m * k * n) as f64;
    let projections = 2.0 * mm(l, c, c);
    let self_attn = 4.0 * mm(l, c, c) + 2.0 * mm(l, c, l);
    let cross_attn = 2.0 * mm(l, c, c) + 2.0 * mm(s, d, c) + 2.0 * mm(l, c, s);
    let feed_forward = mm(l, c, 8 * c) + mm(l, 4 * c, c);
    projections + self_attn + cross_attn + feed_forward
}

/// A noisy batch at t = 500 and its text context.
fn unet_inputs(p: &Policy, n: usize) -> anyhow::Result<(Tensor, Tensor)> {
    let (c, s) = (p.config.unet.in_channels, p.config.image_size);
    let x = NoiseRng::new(1).randn((n, c, s, s), &Device::Cpu)?;
    let t = Tensor::from_vec(vec![500f32; n], n, &Device::Cpu)?;
    Ok((x, t))
}

/// One UNet forward pass (no text encoder, no gradient).
fn unet_fwd(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let p = default_policy()?;
    let n = sizes.unet_batch;
    let (x, t) = unet_inputs(&p, n)?;
    let ctx = p.encode_prompts(&vec![PROMPT; n])?.detach();
    measure(cfg, format!("batch {n}, 32x32"), None, || {
        p.unet.forward(&x, &t, &ctx)?;
        Ok(Parts::new())
    })
}

/// One DDPM training step: text encoder + UNet forward, MSE to the noise, backward, AdamW.
fn train_step(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let p = default_policy()?;
    let n = sizes.train_batch;
    let (x, t) = unet_inputs(&p, n)?;
    let target = NoiseRng::new(2).randn(x.shape(), &Device::Cpu)?;
    let prompts = vec![PROMPT; n];
    let mut opt = AdamW::new(p.trainable_vars(), AdamWConfig::default())?;
    measure(cfg, format!("batch {n}, text encoder + UNet, AdamW"), None, || {
        // As the trainers do: one shard of the batch per core, gradients summed.
        let shards = crate::kernels::shards::sharded_backward(n, &Device::Cpu, |r| -> candle_core::Result<_> {
            let rows = |v: &Tensor| v.narrow(0, r.start, r.len());
            let ctx = p.encode_prompts(&prompts[r.clone()])?;
            let loss = (p.unet.forward(&rows(&x)?, &rows(&t)?, &ctx)? - rows(&target)?)?.sqr()?.mean_all()?;
            Ok((loss, ()))
        })?;
        opt.step(&opt.collect_sum(shards.iter().map(|s| &s.grads))?)?;
        Ok(Parts::new())
    })
}

/// One guided DDIM sampling (eta 1, guidance 5, with per-step log-probs).
fn ddim(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let p = PixelPolicy(default_policy()?);
    let (n, steps) = sizes.ddim;
    let prompts = vec![PROMPT.to_string(); n];
    let scfg = SamplerConfig { steps, ..SamplerConfig::default() };
    let shape = format!("{n} images, {steps} steps, guidance {}, eta {}", scfg.guidance, scfg.eta);
    measure(cfg, shape, None, || {
        sampler::sample(&p, &prompts, &scfg, &mut NoiseRng::new(0))?;
        Ok(Parts::new())
    })
}

/// One DDPO-IS epoch with the JPEG-compressibility reward, split into its phases.
fn ddpo_epoch(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let (samples, steps) = sizes.epoch;
    let defaults = TrainConfig::default();
    let config = TrainConfig {
        samples_per_epoch: samples,
        sample_batch_size: defaults.sample_batch_size.min(samples),
        train_batch_size: defaults.train_batch_size.min(samples),
        sampler: SamplerConfig { steps, ..defaults.sampler },
        ..defaults
    };
    let shape = format!(
        "{samples} samples, {steps} steps, sample batch {}, train batch {}, jpeg reward",
        config.sample_batch_size, config.train_batch_size
    );
    let mut trainer = Trainer::new(
        config,
        Box::new(PixelPolicy(default_policy()?)),
        Arc::new(JpegCompressibility),
        Box::new(FixedPrompts::shapes_default()),
    )?;
    measure(cfg, shape, None, || epoch_parts(&mut trainer))
}

fn epoch_parts(trainer: &mut Trainer) -> anyhow::Result<Parts> {
    let r = trainer.run_epoch()?;
    Ok(BTreeMap::from([
        ("sampling".to_string(), r.seconds_sampling),
        ("reward".to_string(), r.seconds_reward),
        ("training".to_string(), r.seconds_training),
    ]))
}

/// The tiny Stable Diffusion pipeline shipped with the tests (latent 16x16, images 32x32).
const TINY_SD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");

/// One DDPO-IS epoch on tiny-sd with the reference timing's settings (tests/fixtures/tiny-sd/
/// README.md: 8 samples in batches of 4, 20 steps, eta 1, guidance 5, train batch 2, timestep
/// fraction 1, JPEG compressibility), training LoRA adapters (rank 4) or the whole UNet.
fn sd_epoch(sizes: &Sizes, cfg: &BenchConfig, lora: bool) -> anyhow::Result<Timing> {
    let (samples, sample_batch, train_batch, steps) = sizes.sd_epoch;
    let config = TrainConfig {
        samples_per_epoch: samples,
        sample_batch_size: sample_batch,
        train_batch_size: train_batch,
        sampler: SamplerConfig { steps, ..SamplerConfig::default() },
        ..TrainConfig::default()
    };
    let finetune = if lora {
        Finetune::Lora { config: LoraConfig { rank: 4, alpha: 4.0 }, seed: 0 }
    } else {
        Finetune::FullUnet
    };
    let policy = LatentPolicy::load(std::path::Path::new(TINY_SD), finetune, candle_core::DType::F32, &Device::Cpu)
        .context("loading tests/fixtures/tiny-sd (run the bench from the source checkout)")?;
    let shape = format!(
        "tiny-sd {}, {samples} samples (batches of {sample_batch}), {steps} steps, train batch {train_batch}, jpeg reward",
        if lora { "LoRA rank 4" } else { "full UNet" }
    );
    let mut trainer = Trainer::new(config, Box::new(policy), Arc::new(JpegCompressibility), Box::new(FixedPrompts::animals()))?;
    measure(cfg, shape, None, || epoch_parts(&mut trainer))
}

/// Image embeddings of the shipped small CLIP's architecture (random weights, seed 0) on
/// shapes-world images: preprocessing, both conv stages and the projection, L2-normalised.
fn clip_small(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    use crate::reward::shapes_clip::{ShapesClip, ShapesClipConfig};
    let n = sizes.clip.0;
    let config = ShapesClipConfig::shapes_default();
    let model = ShapesClip::new(&config, seeded_var_builder(&candle_nn::VarMap::new(), 0, &Device::Cpu))?;
    let world = crate::world::ShapesWorld::default().batch(0, n);
    let images: Vec<_> = world.iter().map(|s| &s.image).collect();
    // Conv MACs per image: each stage's output pixels x out x in x 9, then the projection.
    let (mut side, mut in_c, mut macs) = (config.image_size, 3, 0usize);
    for (i, &c) in config.channels.iter().enumerate() {
        if i > 0 {
            side /= 2;
        }
        macs += side * side * c * in_c * 9;
        in_c = c;
    }
    macs += in_c * side * side * config.embed_dim;
    let shape = format!("{n} images 32x32, channels {:?}, embed {}", config.channels, config.embed_dim);
    let mut t = measure(cfg, shape, Some(2.0 * (macs * n) as f64), || {
        model.image_embeddings(&images)?;
        Ok(Parts::new())
    })?;
    t.items_per_s = Some(n as f64 / (t.median_ms / 1e3));
    Ok(t)
}

/// Image embeddings of a randomly initialised CLIP of ViT-B/32's size (224 px, 12 layers of
/// width 768, 512-d projection) through candle-transformers, from preprocessed pixels.
fn clip_vit_b32(sizes: &Sizes, cfg: &BenchConfig) -> anyhow::Result<Timing> {
    let n = sizes.clip.1;
    let config = crate::reward::clip::vit_b32();
    let vb = seeded_var_builder(&candle_nn::VarMap::new(), 0, &Device::Cpu);
    let model = candle_transformers::models::clip::ClipModel::new(vb, &config)?;
    let pixels = randn(1, &[n, 3, 224, 224], 1.0)?;
    let v = &config.vision_config;
    let tokens = (v.image_size / v.patch_size).pow(2) + 1;
    let d = v.embed_dim;
    let per_layer = tokens * (4 * d * d + 2 * d * v.intermediate_size) + 2 * tokens * tokens * d;
    let macs = (tokens - 1) * d * 3 * v.patch_size * v.patch_size + v.num_hidden_layers * per_layer + d * v.projection_dim;
    let shape = format!("{n} images 224x224, ViT-B/32 (12 x 768, patch 32), random weights");
    let mut t = measure(cfg, shape, Some(2.0 * (macs * n) as f64), || {
        model.get_image_features(&pixels)?;
        Ok(Parts::new())
    })?;
    t.items_per_s = Some(n as f64 / (t.median_ms / 1e3));
    Ok(t)
}
