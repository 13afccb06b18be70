//! An SD3 / SD3.5 diffusers pipeline folder (`--model-dir DIR` whose `model_index.json` names
//! `StableDiffusion3Pipeline`): its transformer, the two CLIP text encoders with their
//! tokenizers, the 16-channel VAE and the `FlowMatchEulerDiscreteScheduler` config, loaded into
//! an [`Sd3Policy`] with what trains (nothing, LoRA adapters on the attention projections, or
//! the whole transformer).
//!
//! Trained weights are saved with the names diffusers' `StableDiffusion3Pipeline.load_lora_weights`
//! reads: `transformer.<module>.lora_A.weight` / `lora_B.weight` (peft names, rank and alpha in
//! the file's metadata, ours and diffusers' `lora_adapter_metadata`), or
//! `transformer.<diffusers name>` for a full transformer. A JSON file
//! beside them names the pipeline folder, so a checkpoint alone says what it finetunes.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::{json, Value};

use super::policy::{Sd3Policy, Trainable};
use super::text::Sd3TextEncoders;
use super::Sd3Transformer;
use crate::family::flow::{FlowSchedule, Spacing};
use crate::family::sd::folder::{check_field, DiffusersFolder, SCHEDULER_CONFIG, VAE_DIR};
use crate::family::sd::load::{adapter_config, check_dtype, read_trained, set_trained};
use crate::family::sd::Vae;
use crate::family::unet::checkpoint::{META_ALPHA, META_RANK, META_TARGETS};
use crate::family::unet::init;
use crate::family::Family;
use crate::io::{save_tensors_atomic_with_metadata, write_atomic};
use crate::model::{Lora, LoraConfig};

/// The `_class_name` of an SD3 / SD3.5 pipeline's `model_index.json`.
pub const PIPELINE_CLASS: &str = "StableDiffusion3Pipeline";
const MODEL_INDEX: &str = "model_index.json";
const TRANSFORMER_DIR: &str = "transformer";
/// The modules that carry adapters, as peft's `target_modules` (every attention projection).
pub const LORA_TARGETS: &str = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out";
/// The prefix of the transformer's weights in a saved file (diffusers' `transformer.`).
const PREFIX: &str = "transformer";

/// The pipeline class `dir/model_index.json` names, if the folder has one.
pub fn pipeline_class(dir: &Path) -> anyhow::Result<Option<String>> {
    let path = dir.join(MODEL_INDEX);
    if !path.is_file() {
        return Ok(None);
    }
    let (_, index) = DiffusersFolder::open(dir)?.json(MODEL_INDEX)?;
    Ok(index["_class_name"].as_str().map(str::to_string))
}

/// Checks the folder's `model_index.json` (an SD3 pipeline) and says whether it has a T5 encoder.
fn check_model_index(folder: &DiffusersFolder) -> anyhow::Result<bool> {
    let (path, index) = folder.json(MODEL_INDEX)?;
    anyhow::ensure!(
        index["_class_name"] == PIPELINE_CLASS,
        "{}: _class_name is {}, not {PIPELINE_CLASS}",
        path.display(),
        index["_class_name"]
    );
    let named = |part: &str| index[part].get(0).is_some_and(|v| !v.is_null());
    let t5 = named("text_encoder_3");
    anyhow::ensure!(
        t5 == named("tokenizer_3"),
        "{}: text_encoder_3 and tokenizer_3 must both be named or both be null",
        path.display()
    );
    Ok(t5)
}

/// `scheduler/scheduler_config.json` of a `FlowMatchEulerDiscreteScheduler`: its shift and
/// diffusers' spacing of the steps, after rejecting the sigma variants not implemented.
fn flow_schedule(folder: &DiffusersFolder) -> anyhow::Result<FlowSchedule> {
    let (path, v) = folder.json(SCHEDULER_CONFIG)?;
    anyhow::ensure!(
        v["_class_name"] == "FlowMatchEulerDiscreteScheduler",
        "{}: _class_name is {}; an SD3 pipeline samples with FlowMatchEulerDiscreteScheduler",
        path.display(),
        v["_class_name"]
    );
    for field in ["use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"] {
        check_field(&path, &v, field, &json!(false))?;
    }
    check_field(&path, &v, "shift_terminal", &Value::Null)?;
    // Step labels are round(1000 sigma) and the transformer's timestep is 1000 sigma.
    check_field(&path, &v, "num_train_timesteps", &json!(1000))?;
    let shift = match &v["shift"] {
        Value::Null => 1.0,
        s => s.as_f64().filter(|s| *s > 0.0 && s.is_finite()).with_context(|| format!("{}: field shift must be a positive number, got {s}", path.display()))?,
    };
    Ok(FlowSchedule { shift, spacing: Spacing::Diffusers { num_train_timesteps: 1000 } })
}

/// Checks that `dir` holds an SD3 pipeline this loader opens (its configs, not its weights);
/// says whether it has a T5 encoder.
pub fn check_folder(dir: &Path) -> anyhow::Result<bool> {
    let folder = DiffusersFolder::open(dir)?;
    let t5 = check_model_index(&folder)?;
    flow_schedule(&folder)?;
    for rel in ["transformer/config.json", "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer", "tokenizer_2", "vae/config.json"] {
        folder.file(rel)?;
    }
    if t5 {
        for rel in ["text_encoder_3/config.json", "tokenizer_3/tokenizer.json"] {
            folder.file(rel)?;
        }
    }
    Ok(t5)
}

/// What trains when a pipeline is opened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Finetune {
    /// Nothing (sampling).
    Frozen,
    /// Fresh LoRA adapters (seeded) on every attention projection of the transformer.
    Lora { config: LoraConfig, seed: u64 },
    /// Every transformer weight, kept in f32 whatever the frozen dtype.
    Full,
}

impl Sd3Policy {
    /// Opens the pipeline for training: its transformer in full, or fresh LoRA adapters (seeded).
    pub fn open_trainable(dir: &Path, lora: Option<LoraConfig>, seed: u64, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let finetune = match lora {
            Some(config) => Finetune::Lora { config, seed },
            None => Finetune::Full,
        };
        Self::load(dir, finetune, dtype, device)
    }

    /// Opens the pipeline for sampling, with trained `weights` (an adapter or a full transformer)
    /// applied.
    pub fn open_frozen(dir: &Path, weights: Option<&Path>, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let Some(weights) = weights else { return Self::load(dir, Finetune::Frozen, dtype, device) };
        let tensors = read_trained(weights, PREFIX, device)?;
        let finetune = match adapter_config(weights, &tensors)? {
            Some(config) => Finetune::Lora { config, seed: 0 },
            None => Finetune::Full,
        };
        let policy = Self::load(dir, finetune, dtype, device)?;
        set_trained(weights, dir, &policy.trainable_vars(), &tensors, &format!("transformer LoRA on {LORA_TARGETS}, or a full transformer"))?;
        Ok(policy)
    }

    /// Loads the pipeline in `dir` with frozen weights in `dtype` and `finetune` deciding what
    /// trains; every file and config field is checked, and errors name them.
    pub fn load(dir: &Path, finetune: Finetune, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        check_dtype(dtype, device)?;
        let with_t5 = check_folder(dir)?;
        let folder = DiffusersFolder::open(dir)?;
        let schedule = flow_schedule(&folder)?;
        let (transformer, trainable) = load_transformer(&dir.join(TRANSFORMER_DIR), finetune, dtype, device)?;
        let cfg = &transformer.config;
        let text = Sd3TextEncoders::load(&folder, with_t5, cfg.joint_attention_dim, cfg.pooled_projection_dim, dtype, device)?;
        let vae = Vae::from_dir_with_dtype(folder.file(VAE_DIR)?, dtype, device)?;
        anyhow::ensure!(
            vae.config().latent_channels == cfg.in_channels,
            "{}/vae/config.json: latent_channels {} differs from the transformer's in_channels {}",
            dir.display(),
            vae.config().latent_channels,
            cfg.in_channels
        );
        let dtype = if finetune == Finetune::Full { DType::F32 } else { dtype };
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Ok(Self { transformer, text, vae, schedule, trainable, dtype, device: device.clone(), dir })
    }

    /// Saves the trained weights atomically (see the module docs), with a JSON file beside them
    /// naming the pipeline folder and the adapter's config.
    pub fn save_weights(&self, path: &Path) -> anyhow::Result<()> {
        let tensors: HashMap<String, Tensor> = self.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        if let Trainable::Lora(lora, _) = &self.trainable {
            meta.insert(META_RANK.into(), lora.rank.to_string());
            meta.insert(META_ALPHA.into(), lora.alpha.to_string());
            meta.insert(META_TARGETS.into(), LORA_TARGETS.into());
            meta.insert(DIFFUSERS_LORA_METADATA.into(), diffusers_lora_metadata(lora).to_string());
        }
        save_tensors_atomic_with_metadata(&tensors, Some(meta), path)?;
        let lora = match &self.trainable {
            Trainable::Lora(lora, _) => Some(lora),
            _ => None,
        };
        let sidecar = json!({ "diffusers_dir": self.dir, "pipeline": PIPELINE_CLASS, "lora": lora });
        write_atomic(&path.with_extension("json"), serde_json::to_string_pretty(&sidecar)?.as_bytes())
    }
}

/// The safetensors metadata key where diffusers (0.34 and later) reads an adapter's peft config,
/// so that `load_lora_weights` applies our alpha instead of assuming alpha = rank.
const DIFFUSERS_LORA_METADATA: &str = "lora_adapter_metadata";

/// The adapter's peft `LoraConfig` fields under diffusers' `transformer.` prefix.
fn diffusers_lora_metadata(lora: &LoraConfig) -> Value {
    let targets: Vec<&str> = LORA_TARGETS.split(',').collect();
    json!({ "transformer.r": lora.rank, "transformer.lora_alpha": lora.alpha, "transformer.target_modules": targets })
}

/// The transformer in `dir` and what of it trains.
fn load_transformer(dir: &Path, finetune: Finetune, dtype: DType, device: &Device) -> anyhow::Result<(Sd3Transformer, Trainable)> {
    Ok(match finetune {
        Finetune::Frozen => (Sd3Transformer::load(dir, dtype, device, None)?, Trainable::Frozen),
        Finetune::Lora { config, seed } => {
            anyhow::ensure!(config.rank > 0, "LoRA rank must be at least 1");
            let varmap = VarMap::new();
            let adapters = Lora::new(config, init::seeded_var_builder(&varmap, seed, device).pp(PREFIX));
            (Sd3Transformer::load(dir, dtype, device, Some(&adapters))?, Trainable::Lora(config, varmap))
        }
        Finetune::Full => {
            let (model, varmap) = Sd3Transformer::load_trainable(dir, device)?;
            (model, Trainable::Full(varmap))
        }
    })
}
