//! A diffusers Stable Diffusion folder on disk (`unet/`, `text_encoder/`, `tokenizer/`,
//! `scheduler/`, `vae/`): where each file lives and its configs read into our config structs.
//!
//! diffusers configs carry many fields; those that select an architecture or a sampler variant we
//! do not implement are checked here against the values we support, so an unsupported checkpoint
//! fails at load with the file and the field named instead of computing something else. Fields
//! that cannot change the result (versions, `upcast_attention`, PNDM-only options) are ignored.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::model::{HeadDims, TextConfig, UNetConfig};
use crate::family::ddpm::ScheduleConfig;

pub const UNET_CONFIG: &str = "unet/config.json";
pub const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
pub const TEXT_CONFIG: &str = "text_encoder/config.json";
pub const TEXT_WEIGHTS: &str = "text_encoder/model.safetensors";
pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
pub const TOKENIZER_DIR: &str = "tokenizer";
pub const VAE_DIR: &str = "vae";

/// A diffusers pipeline folder whose existence has been checked.
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    pub dir: PathBuf,
}

impl DiffusersFolder {
    pub fn open(dir: &Path) -> Result<Self> {
        anyhow::ensure!(
            dir.is_dir(),
            "--model-dir {}: not a folder (expected a diffusers Stable Diffusion folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
            dir.display()
        );
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// `rel` inside the folder, which must exist.
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        let path = self.dir.join(rel);
        anyhow::ensure!(
            path.exists(),
            "{} not found: a diffusers Stable Diffusion folder needs {rel} (download the whole pipeline, e.g. with `huggingface-cli download`; only .safetensors weights are read)",
            path.display()
        );
        Ok(path)
    }

    /// The JSON file `rel` inside the folder, with its path for error messages.
    pub fn json(&self, rel: &str) -> Result<(PathBuf, Value)> {
        let path = self.file(rel)?;
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        Ok((path, value))
    }

    /// `unet/config.json` as a [`UNetConfig`], rejecting architecture variants we do not build.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        let (path, mut v) = self.json(UNET_CONFIG)?;
        let supported = [
            ("act_fn", json!("silu")),
            ("time_embedding_type", json!("positional")),
            ("resnet_time_scale_shift", json!("default")),
            ("mid_block_type", json!("UNetMidBlock2DCrossAttn")),
            ("attention_type", json!("default")),
            ("conv_in_kernel", json!(3)),
            ("conv_out_kernel", json!(3)),
            ("transformer_layers_per_block", json!(1)),
            ("only_cross_attention", json!(false)),
            ("dual_cross_attention", json!(false)),
            ("resnet_skip_time_act", json!(false)),
            ("resnet_out_scale_factor", json!(1.0)),
            ("class_embed_type", Value::Null),
            ("addition_embed_type", Value::Null),
            ("encoder_hid_dim", Value::Null),
            ("encoder_hid_dim_type", Value::Null),
            ("num_class_embeds", Value::Null),
            ("time_cond_proj_dim", Value::Null),
            ("timestep_post_act", Value::Null),
            ("time_embedding_act_fn", Value::Null),
            ("time_embedding_dim", Value::Null),
            ("cross_attention_norm", Value::Null),
        ];
        for (field, want) in &supported {
            check_field(&path, &v, field, want)?;
        }
        check_uints(&path, &v, &["in_channels", "out_channels", "sample_size", "layers_per_block", "cross_attention_dim", "norm_num_groups", "downsample_padding"])?;
        // Newer diffusers name the head count `num_attention_heads`; older ones (SD 1.x, 2.x)
        // misname it `attention_head_dim`. Either way it is the number of heads.
        if !v["num_attention_heads"].is_null() {
            v["attention_head_dim"] = v["num_attention_heads"].clone();
        }
        let cfg: UNetConfig = serde_json::from_value(v)
            .with_context(|| format!("{}: not a supported UNet2DConditionModel config", path.display()))?;
        if let HeadDims::PerBlock(h) = &cfg.attention_head_dim {
            anyhow::ensure!(
                h.len() == cfg.block_out_channels.len(),
                "{}: field attention_head_dim has {} entries, block_out_channels {}",
                path.display(),
                h.len(),
                cfg.block_out_channels.len()
            );
        }
        cfg.validate().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    /// `text_encoder/config.json` as a [`TextConfig`].
    pub fn text_config(&self) -> Result<TextConfig> {
        self.clip_config(TEXT_CONFIG)
    }

    /// The CLIP text encoder config `rel` (a `CLIPTextModel` or `CLIPTextModelWithProjection`)
    /// as a [`TextConfig`].
    pub fn clip_config(&self, rel: &str) -> Result<TextConfig> {
        let (path, v) = self.json(rel)?;
        let act = v["hidden_act"].as_str().unwrap_or("quick_gelu");
        anyhow::ensure!(
            matches!(act, "quick_gelu" | "gelu"),
            "{}: field hidden_act {act:?} is not supported (use \"quick_gelu\" or \"gelu\")",
            path.display()
        );
        check_uints(&path, &v, &["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"])?;
        let cfg: TextConfig = serde_json::from_value(v)
            .with_context(|| format!("{}: not a supported CLIPTextModel config", path.display()))?;
        anyhow::ensure!(
            cfg.num_attention_heads > 0 && cfg.hidden_size % cfg.num_attention_heads == 0,
            "{}: field num_attention_heads {} does not divide hidden_size {}",
            path.display(),
            cfg.num_attention_heads,
            cfg.hidden_size
        );
        Ok(cfg)
    }

    /// `scheduler/scheduler_config.json` (DDIM, PNDM or DDPM style) as the DDIM schedule DDPO
    /// samples with, as the reference does with `DDIMScheduler.from_config`.
    pub fn schedule_config(&self) -> Result<ScheduleConfig> {
        let (path, v) = self.json(SCHEDULER_CONFIG)?;
        let supported = [
            ("prediction_type", json!("epsilon")),
            ("timestep_spacing", json!("leading")),
            // `clip_sample` (with `clip_sample_range`) is read by ScheduleConfig and applied by our
            // DDIM step as by the reference's; dynamic thresholding is not implemented.
            ("thresholding", json!(false)),
            ("rescale_betas_zero_snr", json!(false)),
            ("trained_betas", Value::Null),
        ];
        for (field, want) in &supported {
            check_field(&path, &v, field, want)?;
        }
        let schedule = v["beta_schedule"].as_str().unwrap_or("");
        anyhow::ensure!(
            matches!(schedule, "linear" | "scaled_linear"),
            "{}: field beta_schedule {:?} is not supported (use \"linear\" or \"scaled_linear\")",
            path.display(),
            v["beta_schedule"]
        );
        check_uints(&path, &v, &["num_train_timesteps", "steps_offset"])?;
        // `set_alpha_to_one` only matters when the previous timestep is negative, which never
        // happens here: the last step's previous timestep is clamped to 0, as in the reference.
        let cfg: ScheduleConfig = serde_json::from_value(v)
            .with_context(|| format!("{}: not a supported scheduler config", path.display()))?;
        crate::family::ddpm::NoiseSchedule::new(cfg.clone()).with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }
}

/// Fails unless `field` is absent, or equal to `want` (`null` also accepts `false`, and numbers
/// compare by value so `1` matches `1.0`).
pub fn check_field(path: &Path, v: &Value, field: &str, want: &Value) -> Result<()> {
    let got = &v[field];
    let same = match (got, want) {
        (Value::Null, _) => true,
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Bool(false), Value::Null) => true,
        (Value::Array(items), Value::Bool(false)) => items.iter().all(|i| i == &Value::Bool(false)),
        (a, b) => a == b,
    };
    anyhow::ensure!(
        same,
        "{}: field {field} = {got} is not supported (this loader implements {field} = {want}); use a Stable Diffusion 1.x / 2.x-style pipeline",
        path.display()
    );
    Ok(())
}

/// Checks that the given fields, where present, are non-negative integers.
pub fn check_uints(path: &Path, v: &Value, fields: &[&str]) -> Result<()> {
    for f in fields {
        let got = &v[*f];
        anyhow::ensure!(
            got.is_null() || got.is_u64(),
            "{}: field {f} must be a non-negative integer, got {got}",
            path.display()
        );
    }
    Ok(())
}
