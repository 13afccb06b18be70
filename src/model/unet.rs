//! `UNet2DConditionModel`: Stable Diffusion v1's noise-prediction network, with diffusers' tensor
//! names. The same code runs the embedded pixel-space default and real latent-space checkpoints.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::UNetConfig;
use super::embeddings::{TextTimeEmbedding, TimestepEmbedding, Timesteps};
use super::lora::Lora;
use super::layers::{Conv2d, GroupNorm};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use super::transformer::{SpatialTransformer, SpatialTransformerConfig};

/// One resolution level on the way down: resnets (each optionally followed by a spatial
/// transformer) and an optional stride-2 downsampling conv.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Conv2d>,
}

impl DownBlock {
    /// Returns the block output and the skip activations for the up path.
    fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(&x, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, ctx)?;
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(&x)?;
            skips.push(x.clone());
        }
        Ok((x, skips))
    }
}

/// One resolution level on the way up: resnets fed with concatenated skips, optional spatial
/// transformers, optional nearest-neighbour 2x upsampling followed by a conv.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("skip count follows from the config");
            x = resnet.forward(&Tensor::cat(&[&x, &skip], 1)?, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(&x, ctx)?;
            }
        }
        if let Some(up) = &self.upsampler {
            let (_, _, h, w) = x.dims4()?;
            x = up.forward(&x.upsample_nearest2d(h * 2, w * 2)?)?;
        }
        Ok(x)
    }
}

/// The middle of the UNet: resnet, spatial transformer, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: SpatialTransformer,
    resnet_out: ResnetBlock2D,
}

/// The conditional UNet. `forward(x, t, context)` predicts the noise in `x` at timesteps `t`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with_lora(config, vb, None)
    }

    /// The UNet with LoRA adapters on every attention projection (`to_q`, `to_k`, `to_v`,
    /// `to_out.0`), created through `lora`.
    pub fn new_with_lora(config: &UNetConfig, vb: VarBuilder, lora: Option<&Lora>) -> Result<Self> {
        config.validate().map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb_dim = ch[0] * 4;
        let resnet_cfg = ResnetConfig {
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            temb_channels: temb_dim,
            output_scale_factor: 1.0,
        };
        let transformer_cfg = |channels: usize, heads: usize| SpatialTransformerConfig {
            channels,
            heads,
            context_dim: config.cross_attention_dim,
            groups: config.norm_num_groups,
            use_linear_projection: config.use_linear_projection,
        };

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let has_attn = config.down_block_types[i].starts_with("CrossAttn");
            let heads = config.attention_head_dim.at(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..config.layers_per_block {
                let in_c = if j == 0 { if i == 0 { ch[0] } else { ch[i - 1] } } else { ch[i] };
                resnets.push(ResnetBlock2D::new(in_c, ch[i], resnet_cfg, vb.pp(format!("resnets.{j}")))?);
                if has_attn {
                    let cfg = transformer_cfg(ch[i], heads);
                    attentions.push(SpatialTransformer::new(cfg, vb.pp(format!("attentions.{j}")), lora)?);
                }
            }
            let downsampler = if i + 1 < n {
                let pad = config.downsample_padding;
                Some(Conv2d::new(ch[i], ch[i], 3, 2, pad, vb.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, attentions, downsampler });
        }

        let vb_mid = vb.pp("mid_block");
        let mid_cfg = ResnetConfig { output_scale_factor: config.mid_block_scale_factor, ..resnet_cfg };
        let mid_block = MidBlock {
            resnet_in: ResnetBlock2D::new(ch[n - 1], ch[n - 1], mid_cfg, vb_mid.pp("resnets.0"))?,
            attention: SpatialTransformer::new(
                transformer_cfg(ch[n - 1], config.attention_head_dim.at(n - 1)),
                vb_mid.pp("attentions.0"),
                lora,
            )?,
            resnet_out: ResnetBlock2D::new(ch[n - 1], ch[n - 1], mid_cfg, vb_mid.pp("resnets.1"))?,
        };

        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let level = n - 1 - i;
            let out_c = ch[level];
            let prev_out_c = if i == 0 { ch[n - 1] } else { ch[level + 1] };
            let skip_level_c = ch[level.saturating_sub(1)];
            let has_attn = config.up_block_types[i].starts_with("CrossAttn");
            let heads = config.attention_head_dim.at(level);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            let layers = config.layers_per_block + 1;
            for j in 0..layers {
                let skip_c = if j == layers - 1 { skip_level_c } else { out_c };
                let in_c = if j == 0 { prev_out_c } else { out_c };
                resnets.push(ResnetBlock2D::new(in_c + skip_c, out_c, resnet_cfg, vb.pp(format!("resnets.{j}")))?);
                if has_attn {
                    let cfg = transformer_cfg(out_c, heads);
                    attentions.push(SpatialTransformer::new(cfg, vb.pp(format!("attentions.{j}")), lora)?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Conv2d::new(out_c, out_c, 3, 1, 1, vb.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, attentions, upsampler });
        }

        Ok(Self {
            conv_in: Conv2d::new(config.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            time_proj: Timesteps::new(ch[0], config.flip_sin_to_cos, config.freq_shift),
            time_embedding: TimestepEmbedding::new(ch[0], temb_dim, vb.pp("time_embedding"))?,
            add_embedding: match config.addition_embed_type {
                Some(_) => Some(TextTimeEmbedding::new(
                    config.cross_attention_dim,
                    temb_dim,
                    config.addition_embed_type_num_heads,
                    vb.pp("add_embedding"),
                )?),
                None => None,
            },
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(config.norm_num_groups, ch[0], config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(ch[0], config.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts the noise. `x`: (N, C, H, W); `t`: (N,) timesteps; `context`: (N, S, D) text states.
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let factor = 1 << (self.down_blocks.len() - 1);
        if h % factor != 0 || w % factor != 0 {
            candle_core::bail!("unet input {h}x{w} must be a multiple of {factor} in both dimensions")
        }
        if t.dims() != [n] || context.dim(0)? != n {
            candle_core::bail!(
                "unet: batch {n} needs timesteps of shape [{n}] (got {:?}) and {n} contexts (got {:?})",
                t.dims(),
                context.dims()
            )
        }
        let x = if self.config.center_input_sample { ((x * 2.0)? - 1.0)? } else { x.clone() };
        // The sinusoids are computed in f32; the MLP runs in the weights' dtype (that of `x`).
        let mut temb = self.time_embedding.forward(&self.time_proj.forward(t)?.to_dtype(x.dtype())?)?;
        if let Some(add) = &self.add_embedding {
            temb = (temb + add.forward(context)?)?;
        }
        let mut x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, s) = block.forward(&x, &temb, context)?;
            skips.extend(s);
            x = out;
        }
        let mid = &self.mid_block;
        x = mid.resnet_in.forward(&x, &temb)?;
        x = mid.attention.forward(&x, context)?;
        x = mid.resnet_out.forward(&x, &temb)?;
        for block in &self.up_blocks {
            x = block.forward(&x, &mut skips, &temb, context)?;
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}
