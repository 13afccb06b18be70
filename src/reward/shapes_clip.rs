//! The small CLIP of the shapes world: the embedded default behind `clip_similarity` and the
//! input of the shipped aesthetic head. Unlike [`super::clip`] (inference of real checkpoints
//! through candle-transformers), every layer here is differentiable so that `ddpo pretrain clip`
//! can train it contrastively.
//!
//! - **Image tower:** a small CNN on `image_size`² pixels in [-1, 1]: a stride-1 3x3 conv, then
//!   stride-2 3x3 convs, each followed by GroupNorm + SiLU (the project's fused kernels), then the
//!   flattened feature map (plus its per-channel spatial maximum) through `visual_projection`.
//!   Flattening keeps where things are, which counts and relations need; the maximum says what
//!   is there wherever it is, which shape recognition needs.
//! - **Text tower:** the project's CLIP-style [`TextEncoder`] over the 40-word shapes-world
//!   vocabulary, pooled at the `<eos>` token as CLIP pools at its end-of-text token, then
//!   `text_projection`.
//! - **Loss:** symmetric InfoNCE with a learnable temperature (`logit_scale`, CLIP's
//!   parametrisation, capped at 100), optionally with extra caption negatives for the images
//!   (captions that differ from the true one in one attribute, see [`crate::world::variants`]).
//!
//! Weights are `NAME.safetensors` with `NAME.json` (the [`ShapesClipConfig`]) beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, VarBuilder};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::model::layers::{linear_no_bias, Conv2d, GroupNorm, Linear};
use crate::model::{TextConfig, TextEncoder};
use crate::world::tokenizer::{Tokenizer, EOS_ID};

/// CLIP's initial temperature, ln(1 / 0.07).
pub const LOGIT_SCALE_INIT: f64 = 2.6592;
/// CLIP caps the logit scale at 100.
const LOGIT_SCALE_MAX: f64 = 4.605_170_2;

/// Architecture of the small CLIP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapesClipConfig {
    /// Side of the square input (other sizes are resized to it).
    pub image_size: usize,
    /// Channels of the image tower's convs; the first keeps the resolution, each later one halves it.
    pub channels: Vec<usize>,
    pub norm_groups: usize,
    /// Width of the shared embedding space.
    pub embed_dim: usize,
    pub text: TextConfig,
    /// Also feed the per-channel spatial maximum of the last feature map to the projection:
    /// a position-free "is there a star anywhere" signal next to the flattened map's "where".
    #[serde(default)]
    pub max_pool: bool,
}

impl ShapesClipConfig {
    /// The shipped model: 32x32 images, 16/32/64/128 channels, the diffusion model's text size.
    pub fn shapes_default() -> Self {
        let tok = Tokenizer::default();
        Self {
            image_size: 32,
            channels: vec![16, 32, 64, 128],
            norm_groups: 8,
            embed_dim: 64,
            text: TextConfig::shapes_default(tok.vocab_size(), tok.max_len()),
            max_pool: true,
        }
    }

    /// A very small model for tests (16x16 images).
    pub fn tiny_test() -> Self {
        let tok = Tokenizer::default();
        let mut text = TextConfig::shapes_default(tok.vocab_size(), tok.max_len());
        text.hidden_size = 16;
        text.intermediate_size = 32;
        text.num_hidden_layers = 1;
        text.num_attention_heads = 2;
        Self { image_size: 16, channels: vec![8, 16], norm_groups: 4, embed_dim: 16, text, max_pool: true }
    }

    /// Side of the last feature map.
    fn final_side(&self) -> usize {
        self.image_size >> (self.channels.len() - 1)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.channels.is_empty(), "shapes CLIP config: channels is empty");
        anyhow::ensure!(
            self.image_size % (1 << (self.channels.len() - 1)) == 0 && self.final_side() > 0,
            "shapes CLIP config: image_size {} is not divisible by 2^{} (one halving per channel entry after the first)",
            self.image_size,
            self.channels.len() - 1
        );
        for &c in &self.channels {
            anyhow::ensure!(
                c % self.norm_groups == 0,
                "shapes CLIP config: norm_groups {} does not divide channel count {c}",
                self.norm_groups
            );
        }
        anyhow::ensure!(self.text.vocab_size == Tokenizer::default().vocab_size(), "shapes CLIP config: text.vocab_size must be the shapes-world vocabulary size {}", Tokenizer::default().vocab_size());
        Ok(())
    }
}

/// One conv + GroupNorm-SiLU stage of the image tower.
#[derive(Debug, Clone)]
struct ConvStage {
    conv: Conv2d,
    norm: GroupNorm,
}

impl ConvStage {
    fn new(in_c: usize, out_c: usize, stride: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv2d::new(in_c, out_c, 3, stride, 1, vb.pp("conv"))?,
            norm: GroupNorm::new(groups, out_c, 1e-5, vb.pp("norm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.norm.forward_silu(&self.conv.forward(x)?)
    }
}

/// The image tower: conv stages, flatten, projection.
#[derive(Debug, Clone)]
struct VisionTower {
    stages: Vec<ConvStage>,
    projection: Linear,
    max_pool: bool,
}

impl VisionTower {
    fn new(cfg: &ShapesClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let mut stages = Vec::with_capacity(cfg.channels.len());
        let mut in_c = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            stages.push(ConvStage::new(in_c, c, stride, cfg.norm_groups, vb.pp(format!("vision.stages.{i}")))?);
            in_c = c;
        }
        let side = cfg.final_side();
        let flat = in_c * side * side + if cfg.max_pool { in_c } else { 0 };
        let projection = linear_no_bias(flat, cfg.embed_dim, vb.pp("visual_projection"))?;
        Ok(Self { stages, projection, max_pool: cfg.max_pool })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for stage in &self.stages {
            h = stage.forward(&h)?;
        }
        let flat = h.flatten_from(1)?;
        let features = if self.max_pool { Tensor::cat(&[&flat, &h.flatten_from(2)?.max(2)?], 1)? } else { flat };
        self.projection.forward(&features)
    }
}

/// The small CLIP: both towers, projections and the temperature.
#[derive(Debug, Clone)]
pub struct ShapesClip {
    vision: VisionTower,
    text: TextEncoder,
    text_projection: Linear,
    logit_scale: Tensor,
    config: ShapesClipConfig,
    tokenizer: Tokenizer,
    device: Device,
}

impl ShapesClip {
    pub fn new(cfg: &ShapesClipConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let text = TextEncoder::new(&cfg.text, vb.clone())?;
        Ok(Self {
            vision: VisionTower::new(cfg, vb.clone())?,
            text,
            text_projection: linear_no_bias(cfg.text.hidden_size, cfg.embed_dim, vb.pp("text_projection"))?,
            logit_scale: vb.get_with_hints((), "logit_scale", Init::Const(LOGIT_SCALE_INIT))?,
            config: cfg.clone(),
            tokenizer: Tokenizer::shapes_world(cfg.text.max_position_embeddings),
            device: vb.device().clone(),
        })
    }

    /// Loads `weights` (`.safetensors`) with its `.json` config beside it. A missing or
    /// mis-shaped tensor is an error naming it and the expected shape.
    pub fn load(weights: &Path, device: &Device) -> anyhow::Result<Self> {
        let config = load_config(weights)?;
        let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(weights, device)
            .with_context(|| format!("reading shapes CLIP weights from {}", weights.display()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(&config, vb).with_context(|| format!("{} does not match its config {}", weights.display(), config_path(weights).display()))
    }

    pub fn config(&self) -> &ShapesClipConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The temperature's logit scale (CLIP's `logit_scale`, capped at ln 100).
    pub fn logit_scale(&self) -> candle_core::Result<Tensor> {
        self.logit_scale.minimum(LOGIT_SCALE_MAX)
    }

    /// Images as the tower's input: resized to `image_size` (bilinear) when needed, mapped to
    /// [-1, 1], `(N, 3, S, S)`.
    pub fn pixels(&self, images: &[&RgbImage]) -> anyhow::Result<Tensor> {
        let s = self.config.image_size as u32;
        let sized: Vec<RgbImage> = images
            .iter()
            .map(|img| {
                if img.dimensions() == (s, s) {
                    (*img).clone()
                } else {
                    image::imageops::resize(*img, s, s, image::imageops::FilterType::Triangle)
                }
            })
            .collect();
        Ok(crate::render::images_to_tensor(&sized, &self.device)?)
    }

    /// Token ids `(N, max_len)` of `texts`.
    pub fn tokens(&self, texts: &[&str]) -> anyhow::Result<Tensor> {
        let ids = self.tokenizer.encode_batch(texts);
        Ok(Tensor::from_vec(ids, (texts.len(), self.tokenizer.max_len()), &self.device)?)
    }

    /// Unnormalised image features `(N, embed_dim)` from pixels `(N, 3, S, S)`.
    pub fn image_features(&self, pixels: &Tensor) -> anyhow::Result<Tensor> {
        let s = self.config.image_size;
        let dims = pixels.dims();
        anyhow::ensure!(
            dims.len() == 4 && dims[1] == 3 && dims[2] == s && dims[3] == s,
            "shapes CLIP pixels have shape {dims:?}, expected (N, 3, {s}, {s})"
        );
        Ok(self.vision.forward(pixels)?)
    }

    /// Unnormalised text features `(N, embed_dim)` from token ids, pooled at each row's `<eos>`.
    pub fn text_features(&self, ids: &Tensor) -> anyhow::Result<Tensor> {
        let hidden = self.text.forward(ids)?;
        // A one-hot mask at the <eos> position: a differentiable gather.
        let eos = ids.eq(EOS_ID)?.to_dtype(DType::F32)?;
        let pooled = hidden.broadcast_mul(&eos.unsqueeze(2)?)?.sum(1)?;
        Ok(self.text_projection.forward(&pooled)?)
    }

    /// L2-normalised image embeddings `(N, embed_dim)`.
    pub fn image_embeddings(&self, images: &[&RgbImage]) -> anyhow::Result<Tensor> {
        l2_normalize(&self.image_features(&self.pixels(images)?)?)
    }

    /// L2-normalised text embeddings `(N, embed_dim)`.
    pub fn text_embeddings(&self, texts: &[&str]) -> anyhow::Result<Tensor> {
        l2_normalize(&self.text_features(&self.tokens(texts)?)?)
    }

    /// Symmetric InfoNCE of a batch: `images[i]` belongs to `captions[i]`; `extra_negatives`
    /// are further captions that compete for every image (not for the text-to-image side).
    pub fn contrastive_loss(&self, images: &[&RgbImage], captions: &[&str], extra_negatives: &[&str]) -> anyhow::Result<Tensor> {
        let n = images.len();
        anyhow::ensure!(n > 0 && n == captions.len(), "contrastive loss: {n} images but {} captions", captions.len());
        let img = l2_normalize(&self.image_features(&self.pixels(images)?)?)?;
        let texts: Vec<&str> = captions.iter().chain(extra_negatives).copied().collect();
        let txt = l2_normalize(&self.text_features(&self.tokens(&texts)?)?)?;
        let logits = img.matmul(&txt.t()?)?.broadcast_mul(&self.logit_scale()?.exp()?)?;
        let labels = Tensor::arange(0u32, n as u32, &self.device)?;
        let image_to_text = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let text_to_image = candle_nn::loss::cross_entropy(&logits.narrow(1, 0, n)?.t()?.contiguous()?, &labels)?;
        Ok(((image_to_text + text_to_image)? * 0.5)?)
    }

    /// Writes the weights and the config beside them, atomically.
    pub fn save(config: &ShapesClipConfig, tensors: &HashMap<String, Tensor>, weights: &Path) -> anyhow::Result<()> {
        crate::io::save_tensors_atomic(tensors, weights)?;
        crate::io::write_atomic(&config_path(weights), serde_json::to_string_pretty(config)?.as_bytes())
    }
}

/// The JSON config beside a weights file.
pub fn config_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// Reads and validates the config beside `weights`.
pub fn load_config(weights: &Path) -> anyhow::Result<ShapesClipConfig> {
    let path = config_path(weights);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read shapes CLIP config {} (it must sit next to {})", path.display(), weights.display()))?;
    let config: ShapesClipConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a shapes CLIP config", path.display()))?;
    config.validate().with_context(|| format!("in {}", path.display()))?;
    Ok(config)
}

/// Row-wise L2 normalisation over the last dimension, differentiable.
pub fn l2_normalize(x: &Tensor) -> anyhow::Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}
