//! What goes into the MMDiT's blocks: image patches with their 2-D position embedding
//! (diffusers' `PatchEmbed` with `pos_embed_max_size`), and the conditioning vector from the
//! timestep and the pooled text (`CombinedTimestepTextProjEmbeddings`).

use std::sync::{Arc, Mutex};

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::Sd3Config;
use crate::model::embeddings::{TimestepEmbedding, Timesteps};
use crate::model::layers::Conv2d;

/// The last (patch grid, embedding) computed, shared by the clones of a model.
type CropCache = Arc<Mutex<Option<((usize, usize), Tensor)>>>;

/// Conv patchify (`proj`, kernel and stride = patch size) plus the sin-cos position embedding
/// cropped from the centre of a `pos_embed_max_size`-square grid.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Conv2d,
    patch: usize,
    dim: usize,
    max_size: usize,
    /// diffusers' `base_size`: the grid side at the training resolution, which sets the scale.
    base_size: usize,
    /// The last crop, as added to the tokens: a run samples one latent size, and at 1024² pixels
    /// the window is 4096 x 1536 sines and cosines, as long to compute as a GPU forward pass.
    last_crop: CropCache,
}

impl PatchEmbed {
    pub fn new(cfg: &Sd3Config, vb: VarBuilder) -> Result<Self> {
        let (patch, dim) = (cfg.patch_size, cfg.inner_dim());
        Ok(Self {
            proj: Conv2d::new(cfg.in_channels, dim, patch, patch, 0, vb.pp("proj"))?,
            patch,
            dim,
            max_size: cfg.pos_embed_max_size,
            base_size: cfg.sample_size / patch,
            last_crop: Arc::default(),
        })
    }

    /// `latent`: (N, C, H, W) -> tokens (N, H/p * W/p, dim), row-major over the patch grid.
    pub fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latent.dims4()?;
        if h % self.patch != 0 || w % self.patch != 0 {
            candle_core::bail!("SD3 latent {h}x{w} is not a multiple of the patch size {}", self.patch);
        }
        let (gh, gw) = (h / self.patch, w / self.patch);
        if gh > self.max_size || gw > self.max_size {
            candle_core::bail!("SD3 latent {h}x{w} is {gh}x{gw} patches, beyond pos_embed_max_size {}", self.max_size);
        }
        let tokens = self.proj.forward(latent)?.flatten_from(2)?.transpose(1, 2)?;
        tokens.broadcast_add(&self.cached_crop(gh, gw, &tokens)?)
    }

    /// [`Self::cropped_pos_embed`] as (1, gh * gw, dim) on `tokens`' device and dtype, from the
    /// cache when the last call wanted the same.
    fn cached_crop(&self, gh: usize, gw: usize, tokens: &Tensor) -> Result<Tensor> {
        let mut last = self.last_crop.lock().expect("position embedding cache lock");
        if let Some((grid, t)) = last.as_ref() {
            if *grid == (gh, gw) && t.dtype() == tokens.dtype() && t.device().same_device(tokens.device()) {
                return Ok(t.clone());
            }
        }
        let crop = self.cropped_pos_embed(gh, gw, tokens.device())?.to_dtype(tokens.dtype())?.unsqueeze(0)?;
        *last = Some(((gh, gw), crop.clone()));
        Ok(crop)
    }

    /// The (gh * gw, dim) window of the full grid's embedding that diffusers crops for a
    /// gh x gw input, computed directly: the full grid (SD3.5-Medium: 384² x 1536) is never built.
    pub fn cropped_pos_embed(&self, gh: usize, gw: usize, device: &Device) -> Result<Tensor> {
        let (top, left) = ((self.max_size - gh) / 2, (self.max_size - gw) / 2);
        // Grid coordinates are scaled so that the training-size grid spans [0, base_size);
        // diffusers computes them in f32 and the angles in f64.
        let spacing = self.max_size as f32 / self.base_size as f32;
        let quarter = self.dim / 4;
        let mut data = Vec::with_capacity(gh * gw * self.dim);
        for row in top..top + gh {
            for col in left..left + gw {
                // diffusers' meshgrid puts the column coordinate in the first half.
                for pos in [col, row] {
                    let pos = (pos as f32 / spacing) as f64;
                    let angles = (0..quarter).map(|i| pos / 10000f64.powf(i as f64 / quarter as f64));
                    data.extend(angles.clone().map(|a| a.sin() as f32));
                    data.extend(angles.map(|a| a.cos() as f32));
                }
            }
        }
        Tensor::from_vec(data, (gh * gw, self.dim), device)
    }
}

/// The conditioning vector of every block's modulation: the timestep's sinusoidal features
/// through an MLP (`timestep_embedder`), plus the pooled text through another (`text_embedder`).
#[derive(Debug, Clone)]
pub struct TimeTextEmbed {
    time_proj: Timesteps,
    timestep_embedder: TimestepEmbedding,
    text_embedder: TimestepEmbedding,
}

/// Width of the timestep's sinusoidal features (diffusers fixes it at 256).
const TIME_FEATURES: usize = 256;

impl TimeTextEmbed {
    pub fn new(cfg: &Sd3Config, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            time_proj: Timesteps::new(TIME_FEATURES, true, 0.0),
            timestep_embedder: TimestepEmbedding::new(TIME_FEATURES, dim, vb.pp("timestep_embedder"))?,
            // `PixArtAlphaTextProjection` with SiLU: the same linear_1, SiLU, linear_2 shape.
            text_embedder: TimestepEmbedding::new(cfg.pooled_projection_dim, dim, vb.pp("text_embedder"))?,
        })
    }

    /// `timestep`: (N,) in 0..1000 (sigma x 1000); `pooled`: (N, pooled_projection_dim) -> (N, dim).
    pub fn forward(&self, timestep: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let features = self.time_proj.forward(timestep)?.to_dtype(pooled.dtype())?;
        let t = self.timestep_embedder.forward(&features)?;
        t + self.text_embedder.forward(pooled)?
    }
}
