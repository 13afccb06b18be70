//! CLIP image and text encoders for reward models.
//!
//! This module owns: loading real OpenAI / Hugging Face CLIP checkpoints (ViT-B/32, ViT-L/14)
//! from local `.safetensors` files with their upstream tensor names (`vision_model.*`,
//! `text_model.*`, `visual_projection.weight`, `text_projection.weight`, `logit_scale`) through
//! `candle_transformers::models::clip`; the standard CLIP image preprocessing (shorter side to
//! the model's image size with bicubic resampling, centre crop, scale to 0..1, normalise with the
//! CLIP mean/std); and L2-normalised image/text embeddings with their cosine similarity.
//!
//! Text tokenisation is not done here: [`Clip::text_embeddings`] takes token ids (`(N, L)`,
//! u32), with the end-of-text token as the largest id (CLIP's BPE vocabulary puts `<|endoftext|>`
//! last, and the text tower pools at the argmax id, as upstream does).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::{
    self, text_model::ClipTextConfig, vision_model::ClipVisionConfig, ClipConfig, ClipModel,
};
use image::RgbImage;

/// CLIP's per-channel normalisation mean (RGB), applied after scaling pixels to 0..1.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's per-channel normalisation standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The ViT-B/32 configuration (`openai/clip-vit-base-patch32`, 224 px, 512-d embeddings).
pub fn vit_b32() -> ClipConfig {
    ClipConfig::vit_base_patch32()
}

/// The ViT-L/14 configuration at 224 px (`openai/clip-vit-large-patch14`, 768-d embeddings),
/// the image encoder the LAION aesthetic predictor was trained on.
pub fn vit_l14() -> ClipConfig {
    let text_config = ClipTextConfig {
        vocab_size: 49408,
        embed_dim: 768,
        activation: clip::text_model::Activation::QuickGelu,
        intermediate_size: 3072,
        max_position_embeddings: 77,
        pad_with: None,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        projection_dim: 768,
    };
    let vision_config = ClipVisionConfig {
        embed_dim: 1024,
        activation: clip::text_model::Activation::QuickGelu,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        projection_dim: 768,
        num_channels: 3,
        image_size: 224,
        patch_size: 14,
    };
    ClipConfig { text_config, vision_config, logit_scale_init_value: 2.6592, image_size: 224 }
}

/// A CLIP model (both towers and projections) with its configuration.
#[derive(Debug, Clone)]
pub struct Clip {
    model: ClipModel,
    config: ClipConfig,
    device: Device,
}

impl Clip {
    /// Builds CLIP from a var builder in the upstream naming (candle-nn style).
    ///
    /// The class embedding must be present: candle-transformers silently replaces a missing
    /// `vision_model.embeddings.class_embedding` by random numbers, so it is checked here.
    pub fn new(config: ClipConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let name = "vision_model.embeddings.class_embedding";
        anyhow::ensure!(
            vb.contains_tensor(name),
            "CLIP weights lack tensor {name:?} (expected shape [{}])",
            config.vision_config.embed_dim
        );
        let device = vb.device().clone();
        let model = ClipModel::new(vb, &config)?;
        Ok(Self { model, config, device })
    }

    /// Loads CLIP from a local `.safetensors` checkpoint with the Hugging Face tensor names
    /// (e.g. `model.safetensors` of `openai/clip-vit-large-patch14`). Weights are held as f32.
    /// Errors name the file and, for a missing or mis-shaped tensor, the tensor.
    pub fn load(path: &Path, config: ClipConfig, device: &Device) -> anyhow::Result<Self> {
        let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading CLIP weights from {}", path.display()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(config, vb).with_context(|| {
            format!("loading CLIP weights from {} (upstream tensor names expected)", path.display())
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The underlying candle-transformers model.
    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    /// Side of the square input images (224 for the released models).
    pub fn image_size(&self) -> usize {
        self.config.vision_config.image_size
    }

    /// Width of the (projected) image embedding.
    pub fn image_embed_dim(&self) -> usize {
        self.config.vision_config.projection_dim
    }

    /// CLIP preprocessing of a batch: each image's shorter side is resized to the model's image
    /// size (bicubic), the centre square cropped, pixels scaled to 0..1 and normalised per
    /// channel with [`CLIP_MEAN`] / [`CLIP_STD`]. Returns `(N, 3, S, S)` f32 on the model device.
    pub fn preprocess(&self, images: &[RgbImage]) -> anyhow::Result<Tensor> {
        preprocess(images, self.image_size(), &self.device)
    }

    /// L2-normalised image embeddings `(N, projection_dim)`.
    pub fn image_embeddings(&self, images: &[RgbImage]) -> anyhow::Result<Tensor> {
        let pixels = self.preprocess(images)?;
        self.image_embeddings_from_pixels(&pixels)
    }

    /// L2-normalised image embeddings from already preprocessed pixels `(N, 3, S, S)`.
    pub fn image_embeddings_from_pixels(&self, pixels: &Tensor) -> anyhow::Result<Tensor> {
        let s = self.image_size();
        let dims = pixels.dims();
        anyhow::ensure!(
            dims.len() == 4 && dims[1] == 3 && dims[2] == s && dims[3] == s,
            "CLIP pixels have shape {dims:?}, expected (N, 3, {s}, {s})"
        );
        let features = self.model.get_image_features(pixels)?;
        Ok(clip::div_l2_norm(&features)?)
    }

    /// L2-normalised text embeddings `(N, projection_dim)` from token ids `(N, L)` (u32 or i64),
    /// `L` at most the context length (77 for the released models).
    pub fn text_embeddings(&self, ids: &Tensor) -> anyhow::Result<Tensor> {
        let max = self.config.text_config.max_position_embeddings;
        let (_, len) = ids.dims2().with_context(|| {
            format!("CLIP token ids have shape {:?}, expected (N, L)", ids.dims())
        })?;
        anyhow::ensure!(len <= max, "CLIP token ids have length {len}, at most {max} allowed");
        let features = self.model.get_text_features(ids)?;
        Ok(clip::div_l2_norm(&features)?)
    }

    /// Cosine similarities `(N_img, N_txt)` between L2-normalised embeddings.
    pub fn similarity(img_emb: &Tensor, txt_emb: &Tensor) -> anyhow::Result<Tensor> {
        similarity(img_emb, txt_emb)
    }
}

/// Cosine similarity matrix `(N_img, N_txt)`: rows are images, columns texts. The inputs are
/// normalised again here, so unnormalised embeddings also give cosines.
pub fn similarity(img_emb: &Tensor, txt_emb: &Tensor) -> anyhow::Result<Tensor> {
    let (_, di) = img_emb.dims2().context("image embeddings must be (N, D)")?;
    let (_, dt) = txt_emb.dims2().context("text embeddings must be (N, D)")?;
    anyhow::ensure!(di == dt, "image embeddings have width {di}, text embeddings {dt}");
    let a = clip::div_l2_norm(img_emb)?;
    let b = clip::div_l2_norm(txt_emb)?;
    Ok(a.matmul(&b.t()?)?)
}

/// Resizes so the shorter side is `size` (bicubic, aspect kept; Catmull-Rom, PIL's bicubic
/// kernel, with antialiasing when shrinking) and crops the centre square.
pub fn resize_center_crop(image: &RgbImage, size: usize) -> anyhow::Result<RgbImage> {
    let (w, h) = image.dimensions();
    anyhow::ensure!(w > 0 && h > 0, "cannot preprocess an empty {w}x{h} image for CLIP");
    let s = size as u32;
    // Long side as Hugging Face's CLIPImageProcessor and torchvision's Resize compute it:
    // int(size * long / short), truncated; crop offset floor((new - size) / 2) as in HF.
    let (nw, nh) = if w <= h {
        (s, ((h as u64 * s as u64 / w as u64) as u32).max(s))
    } else {
        (((w as u64 * s as u64 / h as u64) as u32).max(s), s)
    };
    let resized = if (nw, nh) == (w, h) {
        image.clone()
    } else {
        image::imageops::resize(image, nw, nh, image::imageops::FilterType::CatmullRom)
    };
    if (nw, nh) == (s, s) {
        return Ok(resized);
    }
    let left = (nw - s) / 2;
    let top = (nh - s) / 2;
    Ok(image::imageops::crop_imm(&resized, left, top, s, s).to_image())
}

/// CLIP preprocessing (see [`Clip::preprocess`]) to `(N, 3, size, size)` f32 on `device`.
pub fn preprocess(images: &[RgbImage], size: usize, device: &Device) -> anyhow::Result<Tensor> {
    anyhow::ensure!(!images.is_empty(), "no images to preprocess for CLIP");
    let plane = size * size;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (n, image) in images.iter().enumerate() {
        let img = resize_center_crop(image, size)?;
        let base = n * 3 * plane;
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                let v = px[c] as f32 / 255.0;
                data[base + c * plane + i] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
            }
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, size, size), device)?)
}

/// Row-wise L2 normalisation over the last dimension.
pub fn l2_normalize(x: &Tensor) -> anyhow::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}
