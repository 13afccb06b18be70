//! Model configurations as plain structs, with diffusers' / transformers' field names so that a
//! `config.json` from a diffusers folder deserialises directly, and presets for the embedded default.

use serde::{Deserialize, Serialize};

/// `UNet2DConditionModel` configuration (the subset of diffusers' fields this project supports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: usize,
    pub block_out_channels: Vec<usize>,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per resolution: which blocks carry attention.
    pub down_block_types: Vec<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D`, from the lowest resolution up.
    pub up_block_types: Vec<String>,
    pub layers_per_block: usize,
    /// Number of attention heads per block (diffusers <= 0.20 semantics of this field).
    pub attention_head_dim: HeadDims,
    pub cross_attention_dim: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub center_input_sample: bool,
    /// `"text"`: the caption, pooled by attention, is added to the timestep embedding
    /// (diffusers' `TextTimeEmbedding`), so every resnet sees it, not only the attention blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_embed_type: Option<String>,
    #[serde(default = "default_addition_heads")]
    pub addition_embed_type_num_heads: usize,
}

/// `attention_head_dim` is either one number for every block or one per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeadDims {
    Same(usize),
    PerBlock(Vec<usize>),
}

impl HeadDims {
    /// Heads of down block `i` (up blocks use the reversed order, the mid block the last).
    pub fn at(&self, i: usize) -> usize {
        match self {
            HeadDims::Same(h) => *h,
            HeadDims::PerBlock(v) => v[i.min(v.len() - 1)],
        }
    }
}

fn default_addition_heads() -> usize {
    64
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_one_f() -> f64 {
    1.0
}

impl UNetConfig {
    /// The embedded default: a small pixel-space UNet for 32x32 shapes-world images.
    pub fn shapes_default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            sample_size: 32,
            // 16/32/64 channels: about 12 GFLOP per forward pass of 64 images (32/64/128 was 46),
            // which is what makes pretraining on two CPU cores a matter of hours.
            block_out_channels: vec![16, 32, 64],
            // Attention only at 8x8 (and in the mid block): 64 tokens keep self-attention cheap,
            // and cross-attention there is enough to place colours and shapes.
            down_block_types: vec![
                "DownBlock2D".into(),
                "DownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
            ],
            up_block_types: vec![
                "CrossAttnUpBlock2D".into(),
                "UpBlock2D".into(),
                "UpBlock2D".into(),
            ],
            layers_per_block: 1,
            attention_head_dim: HeadDims::Same(4),
            cross_attention_dim: 64,
            norm_num_groups: 8,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            use_linear_projection: false,
            center_input_sample: false,
            addition_embed_type: None,
            addition_embed_type_num_heads: default_addition_heads(),
        }
    }

    /// A candidate second default (never shipped): 1.5x the channels at 32x32 and 16x16, and cross-attention
    /// at 16x16 as well as 8x8, where a shape's outline is a few cells wide.
    pub fn shapes_v2() -> Self {
        Self { block_out_channels: vec![24, 48, 64], ..Self::shapes_v3() }
    }

    /// The v1 UNet with cross-attention at 16x16 as well as 8x8 (v2's attention at v1's width):
    /// the only change to v1 is two new attention blocks, so a v1 model grows into it with
    /// `--init-from` (the new blocks start as the identity) and keeps what it learned.
    pub fn shapes_v3() -> Self {
        Self {
            down_block_types: vec![
                "DownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
            ],
            up_block_types: vec![
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "UpBlock2D".into(),
            ],
            ..Self::shapes_default()
        }
    }

    /// v3 plus the pooled caption in the timestep embedding (`addition_embed_type: "text"`, 4
    /// heads): the 32x32 resnets, where a small shape's outline is drawn, see which shape was asked
    /// for. The new module's last layer norm starts at zero, so a v3 model grows into it unchanged.
    pub fn shapes_v4() -> Self {
        Self {
            addition_embed_type: Some("text".into()),
            addition_embed_type_num_heads: 4,
            ..Self::shapes_v3()
        }
    }

    /// A very small configuration for fast tests (16x16 images).
    pub fn tiny_test() -> Self {
        Self {
            sample_size: 16,
            block_out_channels: vec![16, 32],
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            attention_head_dim: HeadDims::Same(2),
            cross_attention_dim: 32,
            norm_num_groups: 8,
            ..Self::shapes_default()
        }
    }

    /// Checks the fields that must agree with each other, naming the offending field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = self.block_out_channels.len();
        anyhow::ensure!(n > 0, "unet config: block_out_channels is empty");
        anyhow::ensure!(
            self.down_block_types.len() == n && self.up_block_types.len() == n,
            "unet config: down_block_types and up_block_types need {n} entries (one per block_out_channels)"
        );
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            anyhow::ensure!(
                matches!(
                    t.as_str(),
                    "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
                ),
                "unet config: block type {t:?} is not supported (use CrossAttn{{Down,Up}}Block2D or {{Down,Up}}Block2D)"
            );
        }
        if let Some(kind) = &self.addition_embed_type {
            anyhow::ensure!(
                kind == "text",
                "unet config: addition_embed_type {kind:?} is not supported (only \"text\"; SDXL's \"text_time\" is not)"
            );
            let heads = self.addition_embed_type_num_heads;
            anyhow::ensure!(
                heads > 0 && self.cross_attention_dim % heads == 0,
                "unet config: addition_embed_type_num_heads {heads} does not divide cross_attention_dim {}",
                self.cross_attention_dim
            );
        }
        for &c in &self.block_out_channels {
            anyhow::ensure!(
                c % self.norm_num_groups == 0,
                "unet config: norm_num_groups {} does not divide block channels {c}",
                self.norm_num_groups
            );
        }
        Ok(())
    }
}

/// CLIP text transformer configuration (transformers' `CLIPTextConfig` field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    /// `quick_gelu` (CLIP) or `gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_act() -> String {
    "quick_gelu".into()
}

impl TextConfig {
    /// The embedded default's text encoder over the shapes-world vocabulary.
    pub fn shapes_default(vocab_size: usize, max_len: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: max_len,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
        }
    }
}
