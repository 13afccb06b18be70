//! An SD3 transformer from a diffusers `transformer/` folder: `config.json` and
//! `diffusion_pytorch_model.safetensors` (or the shards its `.index.json` lists, as the large
//! checkpoints ship). Frozen weights are memory-mapped in the chosen dtype; trainable ones are
//! read into f32 variables. Errors name the file, and a missing tensor names the tensor; so does a
//! tensor the config has no place for (an SD3.5 file read with an SD3 config would otherwise
//! silently drop its QK norms or second attentions).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

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
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("{} is not a readable safetensors file (corrupt or truncated?)", describe(&files)))?;
        let names = st.tensors().into_iter().map(|(name, _)| name).collect();
        build_checked(&cfg, st, names, dtype, device, lora, &files)
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
        let names = tensors.keys().cloned().collect();
        let model = build_checked(&cfg, tensors, names, DType::F32, device, None, &files)?;
        Ok((model, varmap))
    }
}

/// A weight source that remembers which tensors the model took.
struct Tracked<B> {
    inner: B,
    taken: Arc<Mutex<HashSet<String>>>,
}

impl<B: SimpleBackend> SimpleBackend for Tracked<B> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.taken.lock().expect("taken lock").insert(name.to_string());
        self.inner.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.taken.lock().expect("taken lock").insert(name.to_string());
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Builds the model from `weights` (whose tensors are `names`) and fails if it left any of them.
fn build_checked<B: SimpleBackend + 'static>(
    cfg: &Sd3Config,
    weights: B,
    names: Vec<String>,
    dtype: DType,
    device: &Device,
    lora: Option<&Lora>,
    files: &[PathBuf],
) -> anyhow::Result<Sd3Transformer> {
    let taken = Arc::new(Mutex::new(HashSet::new()));
    let backend = Tracked { inner: weights, taken: taken.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = Sd3Transformer::new(cfg, vb, lora).with_context(|| format!("loading {}", describe(files)))?;
    let taken = taken.lock().expect("taken lock");
    let mut unused: Vec<&String> = names.iter().filter(|n| *n != POS_EMBED_BUFFER && !taken.contains(*n)).collect();
    unused.sort();
    anyhow::ensure!(
        unused.is_empty(),
        "{}: {} tensor(s) the config has no place for, e.g. {:?}: does config.json (num_layers, qk_norm, dual_attention_layers) belong to these weights?",
        describe(files),
        unused.len(),
        &unused[..unused.len().min(3)]
    );
    Ok(model)
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
