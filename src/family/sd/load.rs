//! A [`LatentPolicy`] from a diffusers Stable Diffusion folder (`--model-dir DIR`): the folder's UNet,
//! CLIP text encoder, CLIP BPE tokenizer, VAE and noise schedule, weights memory-mapped in the
//! chosen dtype. What trains is chosen by [`Finetune`]: nothing, LoRA adapters on the UNet's
//! attention projections, or the whole UNet (the text encoder and VAE are always frozen, as in
//! the DDPO reference).
//!
//! Trained weights are saved by [`Policy::save`](crate::family::unet::Policy::save) with the names other tools expect:
//! `unet.<module>.lora_A.weight` / `lora_B.weight` for adapters (peft names, with the `unet.`
//! prefix of diffusers' `load_lora_weights`), `unet.<diffusers name>` for a full UNet.
//! [`LatentPolicy::load_with_weights`] applies either kind, and also reads adapters in the
//! older diffusers naming (`lora.down.weight` / `lora.up.weight`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::folder::{self, DiffusersFolder};
use super::{ClipTokenizer, LatentPolicy, Vae, MAX_LEN};
use crate::family::ddpm::NoiseSchedule;
use crate::family::unet::checkpoint::{LORA_TARGETS, META_ALPHA};
use crate::family::unet::{init, Policy, PolicyConfig};
use crate::model::{Lora, LoraConfig, TextEncoder, UNet2DConditionModel, UNetConfig};

/// Which weights of a diffusers policy are trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Finetune {
    /// Nothing (sampling).
    Frozen,
    /// Fresh LoRA adapters (seeded) on the UNet's to_q, to_k, to_v and to_out.0.
    Lora { config: LoraConfig, seed: u64 },
    /// Every UNet weight, kept in f32 whatever `--dtype` says.
    FullUnet,
}

fn mmap(path: &Path) -> anyhow::Result<MmapedSafetensors> {
    // SAFETY: the file is only read; nothing in this process writes it while it is mapped.
    unsafe { MmapedSafetensors::new(path) }
        .with_context(|| format!("{} is not a readable safetensors file (corrupt or truncated?)", path.display()))
}

/// A frozen weight file's variables, memory-mapped in `dtype`; errors name the file.
pub fn mmap_var_builder(path: &Path, dtype: DType, device: &Device) -> anyhow::Result<VarBuilder<'static>> {
    mmap(path)?;
    // SAFETY: as in `mmap`.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
        .with_context(|| format!("cannot map {}", path.display()))
}

impl LatentPolicy {
    /// Loads the pipeline in `dir` with frozen weights in `dtype` and `finetune` deciding what
    /// trains. Every file, config field and tensor shape is checked, and errors name them.
    pub fn load(dir: &Path, finetune: Finetune, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        check_dtype(dtype, device)?;
        let folder = DiffusersFolder::open(dir)?;
        let unet_cfg = folder.unet_config()?;
        let text_cfg = folder.text_config()?;
        let scheduler = folder.schedule_config()?;
        let tok_dir = folder.file(folder::TOKENIZER_DIR)?;
        let tokenizer = ClipTokenizer::from_dir(&tok_dir).with_context(|| format!("loading the tokenizer from {}", tok_dir.display()))?;
        folder.file(folder::VAE_DIR)?;
        let vae = Vae::from_dir_with_dtype(dir.join(folder::VAE_DIR), dtype, device)?;
        let unet_file = folder.file(folder::UNET_WEIGHTS)?;
        let text_file = folder.file(folder::TEXT_WEIGHTS)?;
        anyhow::ensure!(
            unet_cfg.cross_attention_dim == text_cfg.hidden_size,
            "{}: cross_attention_dim {} differs from {}: hidden_size {}; the UNet and text encoder come from different models",
            dir.join(folder::UNET_CONFIG).display(),
            unet_cfg.cross_attention_dim,
            dir.join(folder::TEXT_CONFIG).display(),
            text_cfg.hidden_size
        );
        anyhow::ensure!(
            vae.config().latent_channels == unet_cfg.in_channels,
            "{}/vae/config.json: latent_channels {} differs from the UNet's in_channels {}",
            dir.display(),
            vae.config().latent_channels,
            unet_cfg.in_channels
        );
        let vae_factor = 1 << (vae.config().block_out_channels.len() - 1);
        let config = PolicyConfig {
            flow_shift: None,
            image_size: unet_cfg.sample_size * vae_factor,
            unet: unet_cfg,
            text_encoder: text_cfg,
            scheduler,
            max_tokens: MAX_LEN,
            lora: match finetune {
                Finetune::Lora { config, .. } => Some(config),
                _ => None,
            },
            diffusers_dir: Some(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())),
        };
        anyhow::ensure!(
            config.max_tokens <= config.text_encoder.max_position_embeddings,
            "{}: max_position_embeddings {} is below the CLIP tokenizer's {MAX_LEN} tokens",
            dir.join(folder::TEXT_CONFIG).display(),
            config.text_encoder.max_position_embeddings
        );
        let text = TextEncoder::new(&config.text_encoder, mmap_var_builder(&text_file, dtype, device)?)
            .with_context(|| shape_hint(&text_file))?;
        let (unet, varmap, unet_dtype) = build_unet(&config.unet, &unet_file, finetune, dtype, device)?;
        let policy = Policy {
            schedule: NoiseSchedule::new(config.scheduler.clone())?,
            config,
            unet,
            text,
            tokenizer: Box::new(tokenizer),
            varmap,
            device: device.clone(),
            unet_dtype,
        };
        Ok(Self { policy, vae })
    }

    /// Loads the pipeline in `dir` and applies trained weights from `weights`: a LoRA adapter
    /// (ours, peft-named, or diffusers' older `lora.down` / `lora.up` names), or a full UNet
    /// saved by a `ddpo train --model-dir` run without LoRA.
    pub fn load_with_weights(dir: &Path, weights: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let tensors = read_trained(weights, "unet", device)?;
        let finetune = match adapter_config(weights, &tensors)? {
            Some(config) => Finetune::Lora { config, seed: 0 },
            None => Finetune::FullUnet,
        };
        let policy = Self::load(dir, finetune, dtype, device)?;
        set_trained(weights, dir, &policy.policy.trainable_vars(), &tensors, &format!("UNet LoRA on {LORA_TARGETS}, or a full UNet"))?;
        Ok(policy)
    }
}

/// Fails for bf16 weights on the CPU, whose matmul candle lacks.
pub fn check_dtype(dtype: DType, device: &Device) -> anyhow::Result<()> {
    anyhow::ensure!(
        !(device.is_cpu() && dtype == DType::BF16),
        "bf16 weights need a CUDA device (candle's CPU matmul has no bf16); use f16 or f32 on the CPU"
    );
    Ok(())
}

/// The tensors of a trained-weights file, named as we name them under the model `prefix`
/// (see [`normalise_name`]).
pub fn read_trained(weights: &Path, prefix: &str, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    anyhow::ensure!(weights.is_file(), "weights file {} not found", weights.display());
    let tensors = candle_core::safetensors::load(weights, device)
        .with_context(|| format!("{} is not a readable safetensors file", weights.display()))?;
    Ok(tensors.into_iter().map(|(k, v)| (normalise_name(&k, prefix), v)).collect())
}

/// Sets every trainable variable of a model loaded from `dir` to its tensor in `tensors` (read
/// from `weights`), checking names and shapes both ways; `applicable` says what could be applied.
pub fn set_trained(weights: &Path, dir: &Path, vars: &[(String, Var)], tensors: &HashMap<String, Tensor>, applicable: &str) -> anyhow::Result<()> {
    for (name, var) in vars {
        let t = tensors.get(name).with_context(|| {
            format!("{} lacks tensor {name} (expected shape {:?}); was it trained on {}?", weights.display(), var.dims(), dir.display())
        })?;
        anyhow::ensure!(
            t.dims() == var.dims(),
            "{}: tensor {name} has shape {:?}, expected {:?}",
            weights.display(),
            t.dims(),
            var.dims()
        );
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    if tensors.len() != vars.len() {
        let known: std::collections::HashSet<&String> = vars.iter().map(|(n, _)| n).collect();
        let extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k)).take(3).collect();
        anyhow::bail!("{}: tensors the model has no place for, e.g. {extra:?} (only {applicable} can be applied)", weights.display());
    }
    Ok(())
}

/// The UNet, its trainable variables (if any) and the dtype it computes in.
fn build_unet(
    cfg: &UNetConfig,
    file: &Path,
    finetune: Finetune,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(UNet2DConditionModel, Option<VarMap>, DType)> {
    match finetune {
        Finetune::Frozen => {
            let unet = UNet2DConditionModel::new(cfg, mmap_var_builder(file, dtype, device)?).with_context(|| shape_hint(file))?;
            Ok((unet, None, dtype))
        }
        Finetune::Lora { config, seed } => {
            anyhow::ensure!(config.rank > 0, "LoRA rank must be at least 1");
            let varmap = VarMap::new();
            // Adapter names get the `unet.` prefix of diffusers' LoRA files.
            let adapters = Lora::new(config, init::seeded_var_builder(&varmap, seed, device).pp("unet"));
            let unet = UNet2DConditionModel::new_with_lora(cfg, mmap_var_builder(file, dtype, device)?, Some(&adapters))
                .with_context(|| shape_hint(file))?;
            Ok((unet, Some(varmap), dtype))
        }
        Finetune::FullUnet => {
            let st = mmap(file)?;
            let varmap = VarMap::new();
            {
                let mut data = varmap.data().lock().expect("varmap lock");
                for (name, _) in st.tensors() {
                    let t = st.load(&name, device)?.to_dtype(DType::F32)?;
                    data.insert(format!("unet.{name}"), Var::from_tensor(&t)?);
                }
            }
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, device).pp("unet");
            let unet = UNet2DConditionModel::new(cfg, vb).with_context(|| shape_hint(file))?;
            Ok((unet, Some(varmap), DType::F32))
        }
    }
}

fn shape_hint(file: &Path) -> String {
    format!("{}: a tensor is missing or has the wrong shape for the folder's config.json", file.display())
}

/// Our names for a trained tensor from other tools: diffusers' older `lora.down` / `lora.up`
/// become peft's `lora_A` / `lora_B`, and every name gets the model's `prefix` (`unet`,
/// `transformer`: that of diffusers' `load_lora_weights`) in place of peft's `base_model.model.`.
fn normalise_name(name: &str, prefix: &str) -> String {
    let name = name.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight");
    let name = name.strip_prefix("base_model.model.").unwrap_or(&name);
    match name.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('.')) {
        Some(_) => name.to_string(),
        None => format!("{prefix}.{name}"),
    }
}

/// The adapter's rank and alpha when `tensors` are LoRA weights: the rank from the tensors, alpha
/// from the file's metadata, else the JSON beside it, else the rank (what diffusers assumes).
pub fn adapter_config(weights: &Path, tensors: &HashMap<String, Tensor>) -> anyhow::Result<Option<LoraConfig>> {
    let Some((name, a)) = tensors.iter().find(|(k, _)| k.ends_with(".lora_A.weight")) else { return Ok(None) };
    let rank = a.dim(0).with_context(|| format!("{}: tensor {name} is not a matrix", weights.display()))?;
    let meta = read_metadata(weights)?;
    let alpha = match meta.get(META_ALPHA) {
        Some(v) => v.parse::<f64>().with_context(|| format!("{}: metadata {META_ALPHA} {v:?} is not a number", weights.display()))?,
        None => match crate::family::unet::checkpoint::load_config(weights).ok().and_then(|c| c.lora) {
            Some(l) => l.alpha,
            None => rank as f64,
        },
    };
    Ok(Some(LoraConfig { rank, alpha }))
}

/// The string metadata of a safetensors file's header (empty when it has none).
pub fn read_metadata(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only map of a file nothing in this process writes; only the header is read.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: bad safetensors header ({e})", path.display()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}
