//! What a command's `--model PATH` names, resolved to a base model and the trained weights to
//! apply to it: a model file, a diffusers folder, a run folder, or any run's checkpoint (full
//! weights or a LoRA adapter, whose base the run's `config.json` records).

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::RunConfig;
use crate::family::unet::checkpoint::load_config;

/// A model to open: `model` with `weights` applied (an adapter or a finetuned UNet).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSource {
    pub model: PathBuf,
    pub weights: Option<PathBuf>,
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.weights {
            Some(w) => write!(f, "{} with the trained weights {}", self.model.display(), w.display()),
            None => write!(f, "{}", self.model.display()),
        }
    }
}

/// Resolves `path` (and explicit trained `weights`, which win) to what to open.
pub fn resolve_model(path: &Path, weights: Option<&Path>) -> anyhow::Result<ModelSource> {
    if let Some(w) = weights {
        return Ok(ModelSource { model: path.to_path_buf(), weights: Some(w.to_path_buf()) });
    }
    if path.join("config.json").is_file() && path.join("checkpoint").is_dir() {
        return from_checkpoint(&path.join("checkpoint/policy.safetensors"), Some(path));
    }
    if path.is_file() {
        return from_checkpoint(path, path.parent().and_then(Path::parent));
    }
    Ok(ModelSource { model: path.to_path_buf(), weights: None })
}

/// A checkpoint file: a full model stands alone; an adapter or a Stable Diffusion UNet goes onto
/// its base, the diffusers folder its config names or the model of the run in `run_dir`.
fn from_checkpoint(file: &Path, run_dir: Option<&Path>) -> anyhow::Result<ModelSource> {
    if let Some(dir) = diffusers_dir(file) {
        return Ok(ModelSource { model: dir, weights: Some(file.to_path_buf()) });
    }
    let Ok(config) = load_config(file) else { return Ok(ModelSource { model: file.to_path_buf(), weights: None }) };
    if config.lora.is_none() {
        return Ok(ModelSource { model: file.to_path_buf(), weights: None });
    }
    let run = run_dir.map(|d| d.join("config.json")).filter(|c| c.is_file()).with_context(|| {
        format!("{} is a LoRA adapter and no run folder around it says its base: pass the base model with --model and the adapter with --lora", file.display())
    })?;
    let text = std::fs::read_to_string(&run).with_context(|| format!("cannot read {}", run.display()))?;
    let config: RunConfig = serde_json::from_str(&text).with_context(|| format!("{} is not a run config", run.display()))?;
    Ok(ModelSource { model: config.model, weights: Some(file.to_path_buf()) })
}

/// The diffusers folder that the JSON beside a checkpoint names (`diffusers_dir`, written by
/// every family that finetunes a pipeline folder), if any.
fn diffusers_dir(weights: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(weights.with_extension("json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["diffusers_dir"].as_str().map(PathBuf::from)
}
