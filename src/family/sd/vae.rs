//! The Stable Diffusion VAE decoder (diffusers `AutoencoderKL`), latents -> images: SD 1.x / 2.x's
//! (4 latent channels, `post_quant_conv`) and SD3's (16 channels, a `shift_factor`, no quant convs).
//!
//! DDPO never trains the VAE and only needs it to turn final latents into images for the reward,
//! so this is an inference-only decoder: loading from a diffusers `vae/` folder (config fields,
//! weights file, errors that name them), the decoder network, the latent scaling and the
//! post-processing to 0..1. The encoder is not built.
//!
//! We do not reuse candle-transformers' `AutoEncoderKL`: in candle 0.11.1 its mid-block
//! `AttentionBlock` feeds a transposed (non-contiguous) activation to a batched matmul against a
//! broadcast weight, which the CPU backend computes wrongly (3.7e-2 max error against diffusers on
//! the tiny-sd fixture). Here every matmul takes contiguous operands.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

pub(super) const CONFIG: &str = "config.json";
pub(super) const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// The fields of a diffusers `vae/config.json` that the decoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// Latents the denoiser sees are `(z - shift_factor) * scaling_factor` for the VAE's own
    /// latents z.
    pub scaling_factor: f64,
    /// 0 for SD 1.x / 2.x (absent or `null` in their configs); SD3's VAE centres its latents.
    pub shift_factor: f64,
    pub use_post_quant_conv: bool,
}

impl VaeConfig {
    /// Parses `config.json`; a missing or mistyped field is named in the error.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading VAE config {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let uint = |field: &str| -> Result<usize> {
            json[field].as_u64().map(|v| v as usize).with_context(|| {
                format!(
                    "{}: field {field} missing or not a non-negative integer",
                    path.display()
                )
            })
        };
        let flag = |field: &str| json[field].as_bool().unwrap_or(true);
        let block_out_channels = json["block_out_channels"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().map(|v| v as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .with_context(|| {
                format!(
                    "{}: field block_out_channels missing or not a list of integers",
                    path.display()
                )
            })?;
        Ok(Self {
            out_channels: uint("out_channels")?,
            block_out_channels,
            layers_per_block: uint("layers_per_block")?,
            latent_channels: uint("latent_channels")?,
            norm_num_groups: uint("norm_num_groups")?,
            // Stable Diffusion 1.x's original config predates the field: diffusers' default.
            scaling_factor: match &json["scaling_factor"] {
                serde_json::Value::Null => 0.18215,
                v => v.as_f64().with_context(|| format!("{}: field scaling_factor is not a number", path.display()))?,
            },
            shift_factor: match &json["shift_factor"] {
                serde_json::Value::Null => 0.0,
                v => v.as_f64().with_context(|| format!("{}: field shift_factor is not a number", path.display()))?,
            },
            use_post_quant_conv: flag("use_post_quant_conv"),
        })
    }
}

/// The VAE of a Stable Diffusion pipeline, used to decode latents.
pub struct Vae {
    decoder: Decoder,
    config: VaeConfig,
    dtype: DType,
}

impl Vae {
    /// Loads `config.json` and `diffusion_pytorch_model.safetensors` from a diffusers `vae/` folder.
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_dir_with_dtype(dir, DType::F32, device)
    }

    /// As [`Vae::from_dir`], with the weights in `dtype` (f16 / bf16 halve the memory on a GPU);
    /// [`Vae::decode`] still takes and returns f32.
    pub fn from_dir_with_dtype(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config = VaeConfig::from_file(&dir.join(CONFIG))?;
        let weights = dir.join(WEIGHTS);
        if !weights.is_file() {
            anyhow::bail!("VAE weights {} not found", weights.display());
        }
        // SAFETY: the file is memory-mapped read-only and not modified while we hold it.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .with_context(|| format!("opening VAE weights {}", weights.display()))?;
        let decoder = Decoder::new(&config, vb).with_context(|| {
            format!(
                "building the VAE decoder from {} (a tensor is missing or misshapen)",
                weights.display()
            )
        })?;
        Ok(Self { decoder, config, dtype })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Images in -1..1, (N, out_channels, H * 2^(blocks-1), W * 2^(blocks-1)), from UNet-space
    /// latents (N, C, H, W): the decoder applied to `latents / scaling_factor + shift_factor`,
    /// as diffusers' pipelines do.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let scaled = latents.to_dtype(self.dtype)?.affine(1.0 / self.config.scaling_factor, self.config.shift_factor)?;
        let image = self.decoder.forward(&scaled).context("VAE decode")?;
        Ok(image.to_dtype(DType::F32)?)
    }

    /// Images in 0..1: `decode` then `(x / 2 + 0.5).clamp(0, 1)`.
    pub fn decode_to_unit(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(post_process(&self.decode(latents)?)?)
    }
}

/// -1..1 images to 0..1, clamped, as diffusers' image processor does.
pub fn post_process(images: &Tensor) -> candle_core::Result<Tensor> {
    images.affine(0.5, 0.5)?.clamp(0f32, 1f32)
}

/// GroupNorm epsilon of every decoder norm (fixed in diffusers' `Decoder`).
const NORM_EPS: f64 = 1e-6;

fn conv(in_c: usize, out_c: usize, kernel: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        ..Default::default()
    };
    candle_nn::conv2d(in_c, out_c, kernel, cfg, vb)
}

fn norm(groups: usize, channels: usize, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, NORM_EPS, vb)
}

/// diffusers `ResnetBlock2D` without a timestep embedding.
struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl Resnet {
    fn new(in_c: usize, out_c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let shortcut = if in_c == out_c {
            None
        } else {
            Some(conv(in_c, out_c, 1, vb.pp("conv_shortcut"))?)
        };
        Ok(Self {
            norm1: norm(groups, in_c, vb.pp("norm1"))?,
            conv1: conv(in_c, out_c, 3, vb.pp("conv1"))?,
            norm2: norm(groups, out_c, vb.pp("norm2"))?,
            conv2: conv(out_c, out_c, 3, vb.pp("conv2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&candle_nn::ops::silu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&candle_nn::ops::silu(&self.norm2.forward(&h)?)?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// A linear layer applied to contiguous (rows, in) input.
struct Dense {
    weight_t: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight_t: vb.get((dim, dim), "weight")?.t()?.contiguous()?,
            bias: vb.get(dim, "bias")?,
        })
    }

    fn forward(&self, rows: &Tensor) -> candle_core::Result<Tensor> {
        rows.matmul(&self.weight_t)?.broadcast_add(&self.bias)
    }
}

/// The mid-block single-head self-attention over pixels, with residual (diffusers `Attention`
/// as built for the VAE: heads 1, dim_head = channels).
struct PixelAttention {
    norm: GroupNorm,
    q: Dense,
    k: Dense,
    v: Dense,
    out: Dense,
}

impl PixelAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: norm(groups, channels, vb.pp("group_norm"))?,
            q: Dense::new(channels, vb.pp("to_q"))?,
            k: Dense::new(channels, vb.pp("to_k"))?,
            v: Dense::new(channels, vb.pp("to_v"))?,
            out: Dense::new(channels, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let rows = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let rows = rows.reshape((b * h * w, c))?;
        let split = |t: Tensor| t.reshape((b, h * w, c));
        let (q, k, v) = (
            split(self.q.forward(&rows)?)?,
            split(self.k.forward(&rows)?)?,
            split(self.v.forward(&rows)?)?,
        );
        let scores = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? / (c as f64).sqrt())?;
        let attended = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        let out = self.out.forward(&attended.reshape((b * h * w, c))?)?;
        let out = out
            .reshape((b, h * w, c))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, c, h, w))?;
        x + out
    }
}

/// diffusers `UpDecoderBlock2D`: resnets, then a nearest-neighbour 2x upsample and conv.
struct UpBlock {
    resnets: Vec<Resnet>,
    upsample: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(x),
        }
    }
}

/// diffusers `Decoder` preceded by `post_quant_conv`.
/// Builds the decoder on `vb` (for fresh weights: [`super::random`]).
pub(super) fn build_decoder(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<()> {
    Decoder::new(cfg, vb).map(drop)
}

struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: (Resnet, PixelAttention, Resnet),
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (groups, latent) = (cfg.norm_num_groups, cfg.latent_channels);
        let channels: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let (Some(&top), Some(&bottom)) = (channels.first(), channels.last()) else {
            candle_core::bail!("block_out_channels is empty")
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(latent, latent, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let mid = vb.pp("mid_block");
        let mid = (
            Resnet::new(top, top, groups, mid.pp("resnets.0"))?,
            PixelAttention::new(top, groups, mid.pp("attentions.0"))?,
            Resnet::new(top, top, groups, mid.pp("resnets.1"))?,
        );
        let mut up_blocks = Vec::new();
        let mut in_c = top;
        for (i, &out_c) in channels.iter().enumerate() {
            let ub = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    Resnet::new(
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        groups,
                        ub.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < channels.len() {
                Some(conv(out_c, out_c, 3, ub.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            in_c = out_c;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv(latent, top, 3, vb.pp("conv_in"))?,
            mid,
            up_blocks,
            norm_out: norm(groups, bottom, vb.pp("conv_norm_out"))?,
            conv_out: conv(bottom, cfg.out_channels, 3, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        let mut x = self.conv_in.forward(&z)?;
        x = self.mid.0.forward(&x)?;
        x = self.mid.1.forward(&x)?;
        x = self.mid.2.forward(&x)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.norm_out.forward(&x)?)?)
    }
}
