//! Sinusoidal timestep features and the timestep MLP (diffusers' `Timesteps`, `TimestepEmbedding`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{linear, Linear};

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
