//! `SD3Transformer2DModel`'s configuration with diffusers' field names, so that a pipeline's
//! `transformer/config.json` deserialises directly. Fields that only newer checkpoints carry
//! (`qk_norm` and `dual_attention_layers`, from SD3.5) default to SD3's behaviour when absent;
//! every other field is required, and unknown fields (`_class_name`, versions) are ignored.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The architecture of an SD3 / SD3.5 MMDiT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sd3Config {
    /// Latent height and width the model was trained at; sets the position embedding's scale.
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the text encoders' sequence states (CLIP-L + CLIP-G padded, or T5).
    pub joint_attention_dim: usize,
    /// Width of the text tokens inside the blocks; joint attention needs it equal to the image
    /// tokens' width (heads x head dim).
    pub caption_projection_dim: usize,
    /// Width of the pooled text embedding (CLIP-L and CLIP-G pooled, concatenated).
    pub pooled_projection_dim: usize,
    /// `null` in a config means `in_channels`, as in diffusers.
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Side, in patches, of the position-embedding grid that each input's embedding is cropped from.
    pub pos_embed_max_size: usize,
    /// `"rms_norm"` (SD3.5): RMSNorm on every head's queries and keys; `null` (SD3): none.
    #[serde(default)]
    pub qk_norm: Option<String>,
    /// Blocks with MMDiT-X's second self-attention over the image tokens (SD3.5-Medium).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
}

impl Sd3Config {
    /// Reads and checks a diffusers `transformer/config.json`; errors name the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(path.is_file(), "{} not found: an SD3 transformer folder holds config.json beside its weights", path.display());
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a supported SD3Transformer2DModel config", path.display()))?;
        cfg.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    /// Width of the image (and text) tokens inside the blocks.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Whether queries and keys are RMS-normalised per head.
    pub fn qk_rms_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    /// Fails on a config the model cannot be built from, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (name, v) in [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
            ("pos_embed_max_size", self.pos_embed_max_size),
        ] {
            anyhow::ensure!(v > 0, "field {name} must be positive, got 0");
        }
        anyhow::ensure!(
            self.caption_projection_dim == self.inner_dim(),
            "caption_projection_dim {} must equal num_attention_heads x attention_head_dim = {} (text and image tokens share the joint attention)",
            self.caption_projection_dim,
            self.inner_dim()
        );
        // The 2-D sin-cos position embedding splits the width in four (sin, cos per axis).
        anyhow::ensure!(self.inner_dim().is_multiple_of(4), "num_attention_heads x attention_head_dim = {} must be a multiple of 4", self.inner_dim());
        if let Some(norm) = &self.qk_norm {
            anyhow::ensure!(norm == "rms_norm", "field qk_norm = {norm:?} is not supported (SD3.5 uses \"rms_norm\"; SD3 null)");
        }
        if let Some(&i) = self.dual_attention_layers.iter().find(|&&i| i >= self.num_layers) {
            anyhow::bail!("dual_attention_layers names block {i}, but num_layers is {}", self.num_layers);
        }
        Ok(())
    }

    /// Stable Diffusion 3.5 Medium's published `transformer/config.json`.
    pub fn sd35_medium() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: 384,
            qk_norm: Some("rms_norm".into()),
            dual_attention_layers: (0..=12).collect(),
        }
    }
}
