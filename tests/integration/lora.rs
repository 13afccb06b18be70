//! LoRA adapters on the UNet's attention projections: peft names, no change at attachment, only
//! adapters trainable, and gradients reaching every adapter tensor.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ddpo::model::LoraConfig;
use ddpo::optim::{AdamW, AdamWConfig};
use ddpo::family::{Family, NoiseRng, PixelPolicy, Policy, PolicyConfig, SamplerConfig};
use ddpo::sampler;

fn base_and_lora() -> (PixelPolicy, PixelPolicy) {
    let base = Policy::new_random(PolicyConfig::tiny_test(), 4, &Device::Cpu).unwrap();
    let weights: std::collections::HashMap<String, Tensor> =
        base.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let lora = Policy::with_lora(PolicyConfig::tiny_test(), vb, LoraConfig { rank: 2, alpha: 4.0 }, 9, &Device::Cpu).unwrap();
    (PixelPolicy(base), PixelPolicy(lora))
}

#[test]
fn adapters_use_peft_names_and_are_the_only_trainable_weights() {
    let (base, lora) = base_and_lora();
    let names: Vec<String> = lora.trainable_vars().into_iter().map(|(n, _)| n).collect();
    // tiny_test has one attention level and the mid block: 3 spatial transformers (down, mid, up x2
    // for layers_per_block + 1), each with 2 attentions x 4 projections x (A, B).
    assert!(!names.is_empty() && names.len() % 8 == 0, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")), "{names:?}");
    assert!(names.contains(&"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight".to_string()));
    assert!(names.iter().any(|n| n.contains(".to_out.0.lora_B.weight")));
    assert!(lora.0.parameter_count() * 10 < base.0.parameter_count());
}

#[test]
fn attaching_adapters_leaves_the_output_unchanged() {
    let (base, lora) = base_and_lora();
    let prompts = vec!["a red circle on a blue background".to_string(); 2];
    let cfg = SamplerConfig { steps: 2, ..Default::default() };
    let a = sampler::sample(&base, &prompts, &cfg, &mut NoiseRng::new(1)).unwrap();
    let b = sampler::sample(&lora, &prompts, &cfg, &mut NoiseRng::new(1)).unwrap();
    let diff: f32 = (a.final_sample() - b.final_sample()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(diff < 1e-6, "max difference {diff}");
}

#[test]
fn gradients_reach_every_adapter_tensor() {
    let (_, lora) = base_and_lora();
    let prompts = vec!["a red circle on a blue background".to_string(), "a white ring on a black background".to_string()];
    let cfg = SamplerConfig { steps: 2, ..Default::default() };
    let traj = sampler::sample(&lora, &prompts, &cfg, &mut NoiseRng::new(2)).unwrap();
    let ts = vec![traj.timesteps[0]; 2];
    let adv = Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
    let loss = || {
        let lp = sampler::transition(&lora, &prompts, &traj.latents[0], &traj.latents[1], &ts, &cfg).unwrap().log_prob;
        (lp * &adv).unwrap().mean_all().unwrap().neg().unwrap()
    };
    let mut opt = AdamW::new(lora.trainable_vars(), AdamWConfig { lr: 1e-2, ..Default::default() }).unwrap();
    // B starts at zero, so A only receives gradient once B has moved: take one step first.
    let g = opt.collect(&loss().backward().unwrap());
    opt.step(&g).unwrap();
    let grads = opt.collect(&loss().backward().unwrap());
    for ((name, _), g) in opt.vars().iter().zip(&grads) {
        let g = g.as_ref().unwrap_or_else(|| panic!("{name} received no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
}

#[test]
fn cli_trains_an_adapter_and_samples_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.safetensors");
    Policy::new_random(PolicyConfig::tiny_test(), 0, &Device::Cpu).unwrap().save(&model).unwrap();
    let run = dir.path().join("run");
    let ddpo = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, stderr) = ddpo(&[
        "train", "--model", model.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--lora-rank", "2",
        "--epochs", "1", "--samples-per-epoch", "4", "--sample-batch-size", "2", "--train-batch-size", "2",
        "--steps", "3", "--clip-range", "0.2", "--lr", "1e-2", "--reward", "brightness",
    ]);
    assert!(ok, "{stderr}");
    let adapter = run.join("checkpoint/policy.safetensors");
    let tensors = candle_core::safetensors::load(&adapter, &Device::Cpu).unwrap();
    assert!(!tensors.is_empty() && tensors.keys().all(|k| k.contains(".lora_")), "{:?}", tensors.keys());
    let trained_b = tensors.iter().any(|(k, t)| {
        k.ends_with("lora_B.weight") && t.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
    });
    assert!(trained_b, "no lora_B moved from zero");
    let out = dir.path().join("s.png");
    let (ok, stderr) = ddpo(&["sample", "--model", model.to_str().unwrap(), "--lora", adapter.to_str().unwrap(), "--prompt", "a red circle on a blue background", "-n", "2", "--steps", "2", "--out", out.to_str().unwrap()]);
    assert!(ok && out.exists(), "{stderr}");
    // The adapter alone, or its run folder: the run's config names the base model.
    for model in [adapter.to_str().unwrap(), run.to_str().unwrap()] {
        let (ok, stderr) = ddpo(&["sample", "--model", model, "--prompt", "a red circle", "-n", "2", "--steps", "2", "--out", out.to_str().unwrap()]);
        assert!(ok && stderr.contains("with the trained weights") && stderr.contains("tiny.safetensors"), "{stderr}");
        let (ok, stderr) = ddpo(&["eval", "--model", model, "--prompt", "a red circle on a blue background", "--per-prompt", "2", "--steps", "2"]);
        assert!(ok && stderr.contains("with the trained weights"), "{stderr}");
    }
    // The REPL opens the run folder too, and trains the adapter on.
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut repl = ddpo::cli::repl::open(ddpo::cli::repl::Options {
        model: run.clone(),
        reward: scripts.join("reward.rhai"),
        prompts: scripts.join("prompts.rhai"),
        hooks: None,
        run_dir: dir.path().join("repl"),
        seed: 0,
        device: Device::Cpu,
        log: Arc::new(|_: &str| {}),
        interrupt: Arc::new(AtomicBool::new(false)),
        vlm: None,
    })
    .unwrap();
    for line in ["set(\"steps\", 3)", "set(\"samples_per_epoch\", 4)", "set(\"sample_batch_size\", 2)", "set(\"train_batch_size\", 2)"] {
        repl.feed(line).unwrap();
    }
    let trained_out = repl.feed("train(1)").unwrap();
    assert!(trained_out.contains("epoch   0"), "{trained_out}");
    let trained = candle_core::safetensors::load(dir.path().join("repl/checkpoint/policy.safetensors"), &Device::Cpu).unwrap();
    assert!(trained.keys().all(|k| k.contains(".lora_")), "the REPL should train the adapter: {:?}", trained.keys());
    // An adapter outside any run folder has no base to go on: a clear error.
    let lone = dir.path().join("lone.safetensors");
    std::fs::copy(&adapter, &lone).unwrap();
    std::fs::copy(adapter.with_extension("json"), lone.with_extension("json")).unwrap();
    let (ok, stderr) = ddpo(&["sample", "--model", lone.to_str().unwrap(), "--prompt", "a red circle", "--out", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("is a LoRA adapter") && stderr.contains("--lora"), "{stderr}");
}

/// With adapters the policy is its own KL reference: switched off, they leave the base model's
/// step exactly, however far training moved them; the KL to it is zero until they move.
#[test]
fn adapters_off_is_the_base_model_and_the_kl_reference() {
    let (base, lora) = base_and_lora();
    assert!(lora.has_own_reference() && !base.has_own_reference());
    let prompts = vec!["a red circle on a blue background".to_string(); 2];
    let cfg = SamplerConfig { steps: 3, ..Default::default() };
    let traj = sampler::sample(&base, &prompts, &cfg, &mut NoiseRng::new(2)).unwrap();
    let ts = vec![traj.timesteps[1]; 2];
    let (x_t, x_prev) = (&traj.latents[1], &traj.latents[2]);
    let kl = |policy: &PixelPolicy| {
        let step = policy.log_prob(&prompts, x_t, x_prev, &ts, &cfg).unwrap();
        let reference = policy.reference_log_prob(&prompts, x_t, x_prev, &ts, &cfg).unwrap();
        ddpo::ddpo::kl_to_base(&step, &reference).unwrap().to_scalar::<f32>().unwrap()
    };
    assert_eq!(kl(&lora), 0.0, "fresh adapters (B = 0) are the reference");
    for (name, var) in lora.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            var.set(&(var.as_tensor() + 0.05).unwrap()).unwrap();
        }
    }
    assert!(kl(&lora) > 0.0, "moved adapters have a KL to the base");
    let base_lp = base.log_prob(&prompts, x_t, x_prev, &ts, &cfg).unwrap().log_prob.to_vec1::<f32>().unwrap();
    let off_lp = lora.reference_log_prob(&prompts, x_t, x_prev, &ts, &cfg).unwrap().log_prob.to_vec1::<f32>().unwrap();
    let on_lp = lora.log_prob(&prompts, x_t, x_prev, &ts, &cfg).unwrap().log_prob.to_vec1::<f32>().unwrap();
    for ((b, off), on) in base_lp.iter().zip(&off_lp).zip(&on_lp) {
        assert!((b - off).abs() < 1e-5, "adapters off {off} vs base {b}");
        assert!((b - on).abs() > 1e-4, "adapters on {on} should differ from the base {b}");
    }
    assert!(base.reference_log_prob(&prompts, x_t, x_prev, &ts, &cfg).is_err(), "a plain policy has no built-in reference");
}

/// A LoRA run's KL term needs no second model: the trainer, given no base (it would refuse the
/// KL term without one), uses the adapters-off reference, and the KL grows as the adapters move.
#[test]
fn a_lora_run_takes_its_kl_reference_from_itself() {
    use ddpo::ddpo::{FixedPrompts, Normalisation, TrainConfig, Trainer};
    let (_, lora) = base_and_lora();
    let config = TrainConfig {
        samples_per_epoch: 4,
        sample_batch_size: 4,
        train_batch_size: 2,
        kl_weight: 1.0,
        normalisation: Normalisation::Batch,
        optimizer: AdamWConfig { lr: 1e-2, warmup_steps: 0, ..Default::default() },
        sampler: SamplerConfig::new(3, 1.0, 2.0),
        min_train_sigma: 0.0,
        ..Default::default()
    };
    let prompts = Box::new(FixedPrompts(vec!["a red circle on a blue background".into(), "a green square on a white background".into()]));
    let reward: Arc<dyn ddpo::reward::Reward> = Arc::new(ddpo::reward::Brightness);
    let mut trainer = Trainer::new(config, Box::new(lora), reward, prompts).unwrap();
    let first = trainer.run_epoch().unwrap();
    assert!(first.kl_base > 0.0 && first.kl_base.is_finite(), "the adapters moved within the epoch: {}", first.kl_base);
    let second = trainer.run_epoch().unwrap();
    assert!(second.kl_base > 0.0, "{}", second.kl_base);
}
