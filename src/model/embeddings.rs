//! Sinusoidal timestep features and the timestep MLP (diffusers' `Timesteps`, `TimestepEmbedding`),
//! and the pooled caption some UNets add to them (`TextTimeEmbedding`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::layers::{attention, linear, LayerNorm, Linear};

/// Sinusoidal embedding of one timestep per sample, as diffusers' `get_timestep_embedding`.
#[derive(Debug, Clone)]
pub struct Timesteps {
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl Timesteps {
    pub fn new(dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Self {
        Self { dim, flip_sin_to_cos, freq_shift }
    }

    /// `t`: (N,) timesteps (any float dtype) -> (N, dim).
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let half = self.dim / 2;
        let exponent: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - self.freq_shift)).exp() as f32)
            .collect();
        let freqs = Tensor::from_vec(exponent, (1, half), t.device())?;
        let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)
        } else {
            Tensor::cat(&[sin, cos], 1)
        }
    }
}

/// Two linear layers with SiLU between them (`linear_1`, `linear_2`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// diffusers' `TextTimeEmbedding` (`addition_embed_type: "text"`): layer norm, attention pooling
/// of the text states into one vector, a projection to the timestep embedding's width, layer norm.
#[derive(Debug, Clone)]
pub struct TextTimeEmbedding {
    norm1: LayerNorm,
    pool: AttentionPooling,
    proj: Linear,
    norm2: LayerNorm,
}

impl TextTimeEmbedding {
    pub fn new(encoder_dim: usize, time_embed_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(encoder_dim, 1e-5, vb.pp("norm1"))?,
            pool: AttentionPooling::new(encoder_dim, heads, vb.pp("pool"))?,
            proj: linear(encoder_dim, time_embed_dim, vb.pp("proj"))?,
            norm2: LayerNorm::new(time_embed_dim, 1e-5, vb.pp("norm2"))?,
        })
    }
}

impl Module for TextTimeEmbedding {
    /// (N, S, D) text states -> (N, time_embed_dim).
    fn forward(&self, context: &Tensor) -> Result<Tensor> {
        let pooled = self.pool.forward(&self.norm1.forward(context)?)?;
        self.norm2.forward(&self.proj.forward(&pooled)?)
    }
}

/// DeepFloyd IF's attention pooling, as diffusers copies it: a query made from the mean token
/// (plus a learned offset) attends over itself and every token.
#[derive(Debug, Clone)]
struct AttentionPooling {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    heads: usize,
}

impl AttentionPooling {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let stdev = 1.0 / (dim as f64).sqrt();
        Ok(Self {
            positional_embedding: vb.get_with_hints((1, dim), "positional_embedding", Init::Randn { mean: 0.0, stdev })?,
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            heads,
        })
    }

    /// (N, S, D) -> (N, D).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let class_token = x.mean_keepdim(1)?.broadcast_add(&self.positional_embedding)?;
        let tokens = Tensor::cat(&[&class_token, x], 1)?;
        let q = self.q_proj.forward(&class_token)?;
        let (k, v) = (self.k_proj.forward(&tokens)?, self.v_proj.forward(&tokens)?);
        attention(&q, &k, &v, self.heads, None)?.squeeze(1)
    }
}
