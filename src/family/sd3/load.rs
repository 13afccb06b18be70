//! An SD3 transformer from a diffusers `transformer/` folder: `config.json` and
//! `diffusion_pytorch_model.safetensors` (or the shards its `.index.json` lists, as the large
//! checkpoints ship). Frozen weights are memory-mapped in the chosen dtype; trainable ones are
//! read into f32 variables. Errors name the file, and a missing tensor names the tensor.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};

use super::{Sd3Config, Sd3Transformer};
use crate::model::lora::Lora;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
pub const WEIGHTS_INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

/// The position embedding table diffusers saves as a buffer: recomputed here, never trained.
const POS_EMBED_BUFFER: &str = "pos_embed.pos_embed";

impl Sd3Transformer {
    /// Loads the transformer in `dir` with frozen weights in `dtype`; `lora` adds adapters.
    pub fn load(dir: &Path, dtype: DType, device: &Device, lora: Option<&Lora>) -> anyhow::Result<Self> {
        let cfg = Sd3Config::from_file(&dir.join(CONFIG))?;
        let files = weight_files(dir)?;
        // SAFETY: the files are only read; nothing in this process writes them while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .with_context(|| format!("{} is not a readable safetensors file (corrupt or truncated?)", describe(&files)))?;
        Self::new(&cfg, vb, lora).with_context(|| format!("loading {}", describe(&files)))
    }

    /// Loads the transformer in `dir` with every weight a trainable f32 variable (full finetuning),
    /// returned in a [`VarMap`] under diffusers' names.
    pub fn load_trainable(dir: &Path, device: &Device) -> anyhow::Result<(Self, VarMap)> {
        let cfg = Sd3Config::from_file(&dir.join(CONFIG))?;
        let files = weight_files(dir)?;
        let varmap = VarMap::new();
        let mut tensors = HashMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for file in &files {
                let loaded = candle_core::safetensors::load(file, device)
                    .with_context(|| format!("{} is not a readable safetensors file", file.display()))?;
                for (name, t) in loaded.into_iter().filter(|(name, _)| name != POS_EMBED_BUFFER) {
                    let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
                    // The model reads the variables' own tensors, so gradients reach them.
                    tensors.insert(name.clone(), var.as_tensor().clone());
                    data.insert(name, var);
                }
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = Self::new(&cfg, vb, None).with_context(|| format!("loading {}", describe(&files)))?;
        Ok((model, varmap))
    }
}

/// The weight files of the transformer folder `dir`: the single file, else the index's shards.
fn weight_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX);
    anyhow::ensure!(
        index.is_file(),
        "{} not found (nor a sharded {WEIGHTS_INDEX}): an SD3 transformer folder needs its weights; only .safetensors are read",
        single.display()
    );
    let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json["weight_map"].as_object().with_context(|| format!("{}: no weight_map object", index.display()))?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    anyhow::ensure!(!shards.is_empty(), "{}: weight_map lists no files", index.display());
    shards
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            anyhow::ensure!(path.is_file(), "{} not found (listed in {})", path.display(), index.display());
            Ok(path)
        })
        .collect()
}

fn describe(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        _ => format!("{} and {} more shard(s)", files[0].display(), files.len() - 1),
    }
}
