//! The Stable Diffusion backend on the tiny-sd fixture, through the same policy seam as the
//! embedded default: `--model-dir` loading (and its errors on broken folders), the reference
//! trajectory recomputed through `Policy` and the sampler, LoRA adapters (gradients, diffusers /
//! peft names, reload), reduced-precision frozen weights, and DDPO end to end with the CLI.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use ddpo::ddpo::{FixedPrompts, Normalisation, TrainConfig, Trainer};
use ddpo::model::LoraConfig;
use ddpo::optim::{AdamW, AdamWConfig};
use ddpo::family::sd::{Finetune, LatentPolicy};
use ddpo::family::{Family, NoiseRng, SamplerConfig};
use ddpo::sampler;

use common::fixtures::{ddpo_cli, edit_json};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
const PROMPTS: [&str; 2] = ["a photo of a cat", "an astronaut riding a horse on the moon"];

fn fixture() -> &'static Path {
    Path::new(FIXTURE)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

fn lora_policy(seed: u64) -> Result<LatentPolicy> {
    let lora = LoraConfig { rank: 2, alpha: 4.0 };
    LatentPolicy::load(fixture(), Finetune::Lora { config: lora, seed }, DType::F32, &Device::Cpu)
}

/// A writable copy of the fixture (files, not links, so the test can break them).
fn copy_fixture(to: &Path) -> Result<()> {
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(to.join(sub))?;
        for entry in std::fs::read_dir(fixture().join(sub))? {
            let entry = entry?;
            let dst = to.join(sub).join(entry.file_name());
            std::fs::write(&dst, std::fs::read(entry.path())?)?;
        }
    }
    Ok(())
}

fn load_error(dir: &Path) -> String {
    match LatentPolicy::load(dir, Finetune::Frozen, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn broken_folders_fail_naming_the_file_field_or_tensor() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("sd");
    copy_fixture(&dir)?;
    LatentPolicy::load(&dir, Finetune::Frozen, DType::F32, &Device::Cpu).context("the intact copy loads")?;

    // Unsupported config values: file and field named.
    let sched = dir.join("scheduler/scheduler_config.json");
    edit_json(&sched, |v| v["prediction_type"] = "v_prediction".into())?;
    let err = load_error(&dir);
    assert!(err.contains("scheduler_config.json") && err.contains("prediction_type"), "{err}");
    edit_json(&sched, |v| v["prediction_type"] = "epsilon".into())?;
    edit_json(&sched, |v| v["beta_schedule"] = "squaredcos_cap_v2".into())?;
    let err = load_error(&dir);
    assert!(err.contains("scheduler_config.json") && err.contains("beta_schedule"), "{err}");
    edit_json(&sched, |v| v["beta_schedule"] = "scaled_linear".into())?;

    let unet_cfg = dir.join("unet/config.json");
    edit_json(&unet_cfg, |v| v["class_embed_type"] = "timestep".into())?;
    let err = load_error(&dir);
    assert!(err.contains("unet/config.json") && err.contains("class_embed_type"), "{err}");
    edit_json(&unet_cfg, |v| v["class_embed_type"] = serde_json::Value::Null)?;
    edit_json(&unet_cfg, |v| v["cross_attention_dim"] = serde_json::json!([32, 32]))?;
    let err = load_error(&dir);
    assert!(err.contains("unet/config.json") && err.contains("cross_attention_dim"), "{err}");

    // SD 2.x style: per-block head counts and upcast_attention load.
    edit_json(&unet_cfg, |v| {
        v["cross_attention_dim"] = 32.into();
        v["attention_head_dim"] = serde_json::json!([8, 8]);
        v["upcast_attention"] = true.into();
    })?;
    LatentPolicy::load(&dir, Finetune::Frozen, DType::F32, &Device::Cpu).context("SD 2.x-style fields")?;

    // A tensor of the wrong shape: named, with the expected shape.
    let weights = dir.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let w = tensors["conv_in.weight"].clone();
    tensors.insert("conv_in.weight".into(), w.narrow(0, 0, 16)?);
    candle_core::safetensors::save(&tensors, &weights)?;
    let err = load_error(&dir);
    assert!(err.contains("conv_in.weight") && err.contains("[32, 4, 3, 3]"), "{err}");

    // A missing file: named.
    std::fs::remove_file(dir.join("text_encoder/model.safetensors"))?;
    let err = load_error(&dir);
    assert!(err.contains("text_encoder/model.safetensors"), "{err}");
    std::fs::remove_file(&unet_cfg)?;
    let err = load_error(&dir);
    assert!(err.contains("unet/config.json") && err.contains("not found"), "{err}");
    Ok(())
}

// The reference trajectory through the policy seam: `ddpo::selftest::sd` (tests/integration/golden_unet.rs).

#[test]
fn gradients_reach_every_lora_tensor_of_the_sd_unet() -> Result<()> {
    let policy = lora_policy(3)?;
    let vars = policy.trainable_vars();
    // tiny-sd: 2 down levels x 2 layers + mid + 2 up levels x 3 layers = 11 transformers, each with
    // 2 attentions x 4 projections x (A, B).
    assert_eq!(vars.len(), 11 * 2 * 4 * 2);
    assert!(vars.iter().all(|(n, _)| n.starts_with("unet.") && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    let prompts: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    let cfg = SamplerConfig { steps: 2, ..Default::default() };
    let traj = sampler::sample(&policy, &prompts, &cfg, &mut NoiseRng::new(2))?;
    let ts = vec![traj.timesteps[0]; 2];
    let adv = Tensor::new(&[1.0f32, -1.0], &Device::Cpu)?;
    let loss = || -> Result<Tensor> {
        let lp = sampler::transition(&policy, &prompts, &traj.latents[0], &traj.latents[1], &ts, &cfg)?.log_prob;
        Ok((lp * &adv)?.mean_all()?.neg()?)
    };
    let mut opt = AdamW::new(vars, AdamWConfig { lr: 1e-2, ..Default::default() })?;
    // B starts at zero, so A only receives gradient once B has moved: take one step first.
    let g = opt.collect(&loss()?.backward()?);
    opt.step(&g)?;
    let grads = opt.collect(&loss()?.backward()?);
    for ((name, _), g) in opt.vars().iter().zip(&grads) {
        let g = g.as_ref().with_context(|| format!("{name} received no gradient"))?;
        let norm: f32 = g.sqr()?.sum_all()?.to_scalar()?;
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
    Ok(())
}

/// Final samples of `policy` for two prompts (same seed, same noise).
fn samples(policy: &dyn Family, steps: usize) -> Result<Tensor> {
    let prompts: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    let cfg = SamplerConfig { steps, ..Default::default() };
    Ok(sampler::sample(policy, &prompts, &cfg, &mut NoiseRng::new(5))?.final_sample().clone())
}

#[test]
fn adapters_save_in_diffusers_names_and_reload_in_either_naming() -> Result<()> {
    let policy = lora_policy(1)?;
    for (i, (_, var)) in policy.trainable_vars().into_iter().enumerate() {
        // Non-zero B so the adapter changes the output.
        var.set(&var.as_tensor().affine(0.0, 0.01 * ((i % 7) as f64 - 3.0))?)?;
    }
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("adapter.safetensors");
    Family::save(&policy, &file)?;
    let meta = ddpo::family::sd::read_metadata(&file)?;
    assert_eq!((meta["lora_rank"].as_str(), meta["lora_alpha"].as_str()), ("2", "4"));
    assert_eq!(meta["target_modules"], "to_q,to_k,to_v,to_out.0");
    let want = samples(&policy, 3)?;
    let base = samples(&LatentPolicy::load(fixture(), Finetune::Frozen, DType::F32, &Device::Cpu)?, 3)?;
    assert!(max_abs_diff(&want, &base)? > 1e-3, "the adapter should change the samples");

    let reloaded = LatentPolicy::load_with_weights(fixture(), &file, DType::F32, &Device::Cpu)?;
    assert_eq!(max_abs_diff(&samples(&reloaded, 3)?, &want)?, 0.0);

    // Older diffusers names, no metadata and no JSON: alpha must then equal the rank.
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"), v))
        .collect();
    let old = tmp.path().join("old.safetensors");
    candle_core::safetensors::save(&renamed, &old)?;
    let p = LatentPolicy::load_with_weights(fixture(), &old, DType::F32, &Device::Cpu)?;
    assert_eq!(p.policy.config.lora, Some(LoraConfig { rank: 2, alpha: 2.0 }));

    // An adapter for another model: the tensor and both shapes named.
    let mut wrong = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight";
    wrong.insert(key.into(), Tensor::zeros((16, 2), DType::F32, &Device::Cpu)?);
    let bad = tmp.path().join("bad.safetensors");
    candle_core::safetensors::save(&wrong, &bad)?;
    let err = format!("{:#}", LatentPolicy::load_with_weights(fixture(), &bad, DType::F32, &Device::Cpu).err().context("bad adapter loaded")?);
    assert!(err.contains(key) && err.contains("[16, 2]") && err.contains("[64, 2]"), "{err}");
    Ok(())
}

#[test]
fn half_precision_frozen_weights_track_f32() -> Result<()> {
    let g = candle_core::safetensors::load(fixture().join("golden.safetensors"), &Device::Cpu)?;
    let x = &g["unet.latents"];
    let eps = |dtype: DType| -> Result<Tensor> {
        let p = LatentPolicy::load(fixture(), Finetune::Lora { config: LoraConfig::default(), seed: 0 }, dtype, &Device::Cpu)?;
        let cond = p.policy.encode_prompts(&PROMPTS)?;
        let uncond = p.policy.encode_prompts(&["", ""])?;
        Ok(p.policy.guided_eps(x, &[500, 500], &cond, &uncond, 5.0)?)
    };
    let full = eps(DType::F32)?;
    // candle's CPU matmul has no bf16; f16 exercises the same casts (bf16 is for GPUs).
    let half = eps(DType::F16)?;
    assert_eq!(half.dtype(), DType::F32, "the sampler always gets f32");
    let scale: f32 = full.abs()?.max_all()?.to_scalar()?;
    let err = max_abs_diff(&full, &half)? / scale;
    println!("f16 frozen weights: max abs error of guided eps {err:e} of its range");
    assert!(err < 0.1, "f16 guided eps off by {err} of its range");
    Ok(())
}

fn small_train_config(samples: usize) -> TrainConfig {
    TrainConfig {
        samples_per_epoch: samples,
        sample_batch_size: 2,
        train_batch_size: 2,
        timestep_fraction: 0.5,
        clip_range: 0.2,
        normalisation: Normalisation::Batch,
        optimizer: AdamWConfig { lr: 1e-2, ..Default::default() },
        sampler: SamplerConfig { steps: 4, ..Default::default() },
        ..Default::default()
    }
}

fn trainer(policy: LatentPolicy, samples: usize) -> Result<Trainer> {
    let reward = Arc::from(ddpo::reward::builtin("compressibility")?);
    let prompts = Box::new(FixedPrompts(vec!["cat".into(), "dog".into()]));
    Trainer::new(small_train_config(samples), Box::new(policy), reward, prompts)
}

/// DDPO with LoRA on the tiny SD pipeline: finite losses, the adapter moves, and a reload of the
/// saved adapter reproduces the finetuned policy's samples exactly.
#[test]
fn ddpo_with_lora_trains_and_reloads() -> Result<()> {
    let mut trainer = trainer(lora_policy(0)?, 4)?;
    for _ in 0..2 {
        let report = trainer.run_epoch()?;
        assert!(report.loss.is_finite() && report.approx_kl.is_finite(), "loss {} kl {}", report.loss, report.approx_kl);
        assert_eq!(report.images.len(), 4);
        assert_eq!(report.images[0].dimensions(), (32, 32));
    }
    let moved = trainer.policy().trainable_vars().iter().any(|(n, v)| {
        n.ends_with("lora_B.weight") && v.as_tensor().abs().and_then(|t| t.sum_all()).and_then(|t| t.to_scalar::<f32>()).unwrap_or(0.0) > 0.0
    });
    assert!(moved, "no lora_B moved from zero");
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("policy.safetensors");
    trainer.policy().save(&file)?;
    let reloaded = LatentPolicy::load_with_weights(fixture(), &file, DType::F32, &Device::Cpu)?;
    assert_eq!(max_abs_diff(&samples(&reloaded, 3)?, &samples(trainer.policy(), 3)?)?, 0.0);
    Ok(())
}

/// The pixel-range penalty has no meaning for latents: asking for it is an error that says so.
#[test]
fn the_range_penalty_is_refused_for_latent_models() -> Result<()> {
    let reward = Arc::from(ddpo::reward::builtin("compressibility")?);
    let prompts = Box::new(FixedPrompts(vec!["cat".into()]));
    let config = TrainConfig { range_penalty: 1.0, ..small_train_config(2) };
    let err = Trainer::new(config, Box::new(lora_policy(0)?), reward, prompts).err().context("accepted")?.to_string();
    assert!(err.contains("range_penalty") && err.contains("set it to 0"), "{err}");
    Ok(())
}

/// Full finetuning trains the UNet only (in f32), and its checkpoint reloads onto the folder.
#[test]
fn full_unet_finetuning_saves_the_unet_and_reloads() -> Result<()> {
    let policy = LatentPolicy::load(fixture(), Finetune::FullUnet, DType::F16, &Device::Cpu)?;
    let names: Vec<String> = policy.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| n.starts_with("unet.")) && names.contains(&"unet.conv_in.weight".to_string()), "{names:?}");
    let mut trainer = trainer(policy, 2)?;
    let report = trainer.run_epoch()?;
    assert!(report.loss.is_finite(), "loss {}", report.loss);
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("policy.safetensors");
    trainer.policy().save(&file)?;
    let reloaded = LatentPolicy::load_with_weights(fixture(), &file, DType::F16, &Device::Cpu)?;
    assert_eq!(reloaded.trainable_vars().len(), names.len());
    assert_eq!(max_abs_diff(&samples(&reloaded, 2)?, &samples(trainer.policy(), 2)?)?, 0.0);
    let base = LatentPolicy::load(fixture(), Finetune::Frozen, DType::F16, &Device::Cpu)?;
    assert!(max_abs_diff(&samples(&reloaded, 2)?, &samples(&base, 2)?)? > 0.0, "training changed nothing");
    Ok(())
}

#[test]
fn cli_trains_on_a_model_dir_and_samples_with_the_result() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let run: PathBuf = tmp.path().join("run");
    let (ok, stderr) = ddpo_cli(&[
        "train", "--model-dir", FIXTURE, "--run-dir", run.to_str().unwrap(), "--lora-rank", "2", "--epochs", "1",
        "--samples-per-epoch", "2", "--sample-batch-size", "2", "--train-batch-size", "2", "--steps", "2",
        "--timestep-fraction", "0.5", "--prompt", "a photo of a cat",
    ]);
    assert!(ok, "{stderr}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().context("no metrics line")?)?;
    assert!(m["loss"].as_f64().is_some_and(f64::is_finite), "{m}");
    let adapter = run.join("checkpoint/policy.safetensors");
    let out = tmp.path().join("s.png");
    let (ok, stderr) = ddpo_cli(&[
        "sample", "--model-dir", FIXTURE, "--lora", adapter.to_str().unwrap(), "--prompt", "a photo of a cat", "-n", "2",
        "--steps", "2", "--out", out.to_str().unwrap(),
    ]);
    assert!(ok && out.exists(), "{stderr}");
    // The adapter alone: its config names the folder it finetunes.
    let (ok, stderr) = ddpo_cli(&["sample", "--model", adapter.to_str().unwrap(), "--prompt", "cat", "--steps", "2", "-n", "2", "--out", out.to_str().unwrap()]);
    assert!(ok && stderr.contains("tiny-sd with the trained weights"), "{stderr}");
    let (ok, stderr) = ddpo_cli(&["sample", "--model-dir", "/no/such/dir", "--prompt", "cat", "--out", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("/no/such/dir: not a folder"), "{stderr}");
    Ok(())
}

/// Each tensor's name and shape in a safetensors file.
fn tensor_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
    Ok(tensors.into_iter().map(|(k, v)| (k, v.dims().to_vec())).collect())
}

#[test]
fn random_weights_take_the_names_and_shapes_diffusers_saves() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let folder = dir.path().join("sd");
    copy_fixture(&folder)?;
    let weights = ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"];
    for w in weights {
        std::fs::remove_file(folder.join(w))?;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpo")).args(["bench", "--random-weights", folder.to_str().unwrap()]).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // The UNet and text encoder files hold exactly the weights diffusers and transformers wrote
    // for the fixture (older transformers also saved the position_ids buffer, which is no
    // weight); the VAE file its decoder's (sampling never encodes).
    for w in &weights[..2] {
        let mut want = tensor_shapes(&fixture().join(w))?;
        want.retain(|k, _| !k.ends_with("position_ids"));
        assert_eq!(tensor_shapes(&folder.join(w))?, want, "{w}");
    }
    let vae = tensor_shapes(&folder.join(weights[2]))?;
    let decoder: HashMap<String, Vec<usize>> =
        tensor_shapes(&fixture().join(weights[2]))?.into_iter().filter(|(k, _)| k.starts_with("decoder.") || k.starts_with("post_quant_conv.")).collect();
    assert_eq!(vae, decoder);
    let unet_params: usize = tensor_shapes(&fixture().join(weights[0]))?.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(counts["unet"].as_u64(), Some(unet_params as u64));
    // The folder now samples; a second fill is refused, naming the file in the way.
    let policy = LatentPolicy::load(&folder, Finetune::Frozen, DType::F32, &Device::Cpu)?;
    let images = samples(&policy, 2)?;
    assert!(images.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite()));
    let (ok, stderr) = ddpo_cli(&["bench", "--random-weights", folder.to_str().unwrap()]);
    assert!(!ok && stderr.contains("unet/diffusion_pytorch_model.safetensors exists"), "{stderr}");
    Ok(())
}
