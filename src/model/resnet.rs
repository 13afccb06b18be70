//! `ResnetBlock2D`: two GroupNorm-SiLU-conv stages with the timestep embedding added between them.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{linear, Conv2d, GroupNorm, Linear};

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// What a resnet block needs to know beyond its channel counts.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: usize,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(in_c: usize, out_c: usize, cfg: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(Conv2d::new(in_c, out_c, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(cfg.groups, in_c, cfg.eps, vb.pp("norm1"))?,
            conv1: Conv2d::new(in_c, out_c, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: linear(cfg.temb_channels, out_c, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(cfg.groups, out_c, cfg.eps, vb.pp("norm2"))?,
            conv2: Conv2d::new(out_c, out_c, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `x`: (N, C, H, W), `temb`: (N, temb_channels).
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // The timestep embedding (N, out_c) rides on conv1's bias: one node, no broadcast add.
        let t = self.time_emb_proj.forward(&temb.silu()?)?;
        let h = self.conv1.forward_plus(&self.norm1.forward_silu(x)?, &t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
