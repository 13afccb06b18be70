//! The LAION "improved aesthetic predictor" and the CLIP-aesthetic reward built on it.
//!
//! This module owns the predictor's MLP exactly as released
//! (`christophschuhmann/improved-aesthetic-predictor`, e.g. `sac+logos+ava1-l14-linearMSE.pth`):
//! `768 -> 1024 -> Dropout(0.2) -> 128 -> Dropout(0.2) -> 64 -> Dropout(0.1) -> 16 -> 1`, with
//! no activations and linear layers at `layers.0`, `layers.2`, `layers.4`, `layers.6`,
//! `layers.7` (weight + bias each). Dropout is the identity at inference, so only the linear
//! layers exist here. The input is the L2-normalised CLIP ViT-L/14 image embedding; the input
//! width is a parameter (768 for the released weights) so that small test versions work.
//! Weights load from `.safetensors` or from the original PyTorch `.pth` state dict.
//!
//! [`ClipAesthetic`] is the [`Reward`]: images -> CLIP image embeddings -> aesthetic score.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use image::RgbImage;

use super::clip::Clip;
use super::{Reward, Score};

/// Input width of the released predictor (CLIP ViT-L/14 embeddings).
pub const AESTHETIC_INPUT_DIM: usize = 768;

/// `(tensor prefix, output width)` of the linear layers after the input, in order.
const LAYERS: [(&str, usize); 5] =
    [("layers.0", 1024), ("layers.2", 128), ("layers.4", 64), ("layers.6", 16), ("layers.7", 1)];

/// The aesthetic MLP: five linear layers, no activations.
#[derive(Debug, Clone)]
pub struct AestheticMlp {
    layers: Vec<Linear>,
    input_dim: usize,
}

impl AestheticMlp {
    /// Builds the MLP from a var builder with the upstream names (candle-nn style).
    pub fn new(input_dim: usize, vb: VarBuilder) -> anyhow::Result<Self> {
        let mut layers = Vec::with_capacity(LAYERS.len());
        let mut width = input_dim;
        for (name, out) in LAYERS {
            let layer = candle_nn::linear(width, out, vb.pp(name)).with_context(|| {
                format!(
                    "aesthetic MLP layer {name}: expected {name}.weight of shape [{out}, {width}] \
                     and {name}.bias of shape [{out}]"
                )
            })?;
            layers.push(layer);
            width = out;
        }
        Ok(Self { layers, input_dim })
    }

    /// Loads the released predictor (input width 768) from `.safetensors` or `.pth`/`.pt`.
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<Self> {
        Self::load_with_input_dim(path, AESTHETIC_INPUT_DIM, device)
    }

    /// Loads a predictor of the given input width. The format follows the extension:
    /// `.safetensors`, or `.pth` / `.pt` / `.bin` for a pickled PyTorch state dict (the zip
    /// format of `torch.save`). Weights are held as f32.
    pub fn load_with_input_dim(
        path: &Path,
        input_dim: usize,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let tensors: HashMap<String, Tensor> = match ext.as_str() {
            "safetensors" => candle_core::safetensors::load(path, device)
                .with_context(|| format!("reading aesthetic weights from {}", path.display()))?,
            "pth" | "pt" | "bin" => candle_core::pickle::read_all(path)
                .with_context(|| {
                    format!("reading PyTorch aesthetic weights from {}", path.display())
                })?
                .into_iter()
                .map(|(name, t)| Ok((name, t.to_device(device)?)))
                .collect::<candle_core::Result<_>>()?,
            _ => anyhow::bail!(
                "aesthetic weights {}: unknown format (expected .safetensors, .pth, .pt or .bin)",
                path.display()
            ),
        };
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(input_dim, vb)
            .with_context(|| format!("loading aesthetic weights from {}", path.display()))
    }

    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Scores `(N, input_dim)` embeddings (already L2-normalised, as the predictor expects),
    /// returning `(N,)`.
    pub fn score(&self, embeddings: &Tensor) -> anyhow::Result<Tensor> {
        let (_, d) = embeddings.dims2().with_context(|| {
            format!(
                "aesthetic input has shape {:?}, expected (N, {})",
                embeddings.dims(),
                self.input_dim
            )
        })?;
        anyhow::ensure!(
            d == self.input_dim,
            "aesthetic input has width {d}, expected {}",
            self.input_dim
        );
        let mut x = embeddings.to_dtype(DType::F32)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(x.squeeze(1)?)
    }
}

/// The JSON sidecar beside a head's weights (written by `ddpo pretrain aesthetic`).
pub fn head_config_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

/// Loads a head; its input width comes from the `input_dim` of the `.json` beside it when there
/// is one (a shipped small head), else it is the released predictor's 768. Only the width is
/// read here: the rest of the sidecar describes the pretraining run.
pub fn load_head(path: &Path, device: &Device) -> anyhow::Result<AestheticMlp> {
    let cfg_path = head_config_path(path);
    let Ok(text) = std::fs::read_to_string(&cfg_path) else {
        return AestheticMlp::load(path, device);
    };
    let input_dim = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|cfg| cfg.get("input_dim")?.as_u64())
        .with_context(|| format!("{} is not an aesthetic head config (no numeric `input_dim`)", cfg_path.display()))?;
    AestheticMlp::load_with_input_dim(path, input_dim as usize, device)
}

/// The CLIP-aesthetic reward: CLIP image embedding (L2-normalised) -> aesthetic MLP.
/// The total is the predicted score (about 1..10 for the released weights); the component
/// `aesthetic` repeats it.
#[derive(Debug, Clone)]
pub struct ClipAesthetic {
    clip: Clip,
    mlp: AestheticMlp,
}

impl ClipAesthetic {
    /// Pairs a CLIP model with a predictor; the CLIP projection width must equal the MLP input.
    pub fn new(clip: Clip, mlp: AestheticMlp) -> anyhow::Result<Self> {
        anyhow::ensure!(
            clip.image_embed_dim() == mlp.input_dim(),
            "CLIP image embeddings have width {}, the aesthetic MLP expects {}",
            clip.image_embed_dim(),
            mlp.input_dim()
        );
        Ok(Self { clip, mlp })
    }

    /// Loads CLIP ViT-L/14 (224 px, safetensors) and the released predictor (768 wide).
    pub fn load(clip_path: &Path, mlp_path: &Path, device: &Device) -> anyhow::Result<Self> {
        let clip = Clip::load(clip_path, super::clip::vit_l14(), device)?;
        let mlp = AestheticMlp::load(mlp_path, device)?;
        Self::new(clip, mlp)
    }

    /// Aesthetic scores `(N,)` for a batch of images.
    pub fn scores(&self, images: &[RgbImage]) -> anyhow::Result<Vec<f32>> {
        let emb = self.clip.image_embeddings(images)?;
        Ok(self.mlp.score(&emb)?.to_vec1::<f32>()?)
    }
}

impl Reward for ClipAesthetic {
    fn name(&self) -> &str {
        "aesthetic"
    }

    fn score(&self, images: &[RgbImage], _prompts: &[String]) -> anyhow::Result<Vec<Score>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self
            .scores(images)?
            .into_iter()
            .map(|s| Score::new(s as f64).with("aesthetic", s as f64))
            .collect())
    }
}
