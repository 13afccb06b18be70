//! DDPM pretraining on a tiny config: the loss falls, checkpoints resume the exact same run, and
//! the exported EMA policy loads for sampling.

use candle_core::Device;
use ddpo::family::{Policy, PolicyConfig};
use ddpo::pretrain::{Event, PretrainConfig, Pretrainer};

fn tiny(steps: usize) -> PretrainConfig {
    PretrainConfig {
        steps,
        batch_size: 8,
        lr: 2e-3,
        warmup: 5,
        checkpoint_every: 5,
        sample_every: 0,
        policy: PolicyConfig::tiny_test(),
        ..Default::default()
    }
}

fn losses(run: &mut Pretrainer) -> Vec<f64> {
    let mut out = Vec::new();
    run.run(&mut |e| if let Event::Step { loss, .. } = e { out.push(loss) }, &|| false).unwrap();
    out
}

#[test]
fn loss_falls_during_pretraining() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = Pretrainer::create(tiny(40), dir.path(), &Device::Cpu).unwrap();
    let l = losses(&mut run);
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "loss went from {first:.3} to {last:.3}");
}

#[test]
fn resume_after_an_interruption_continues_the_same_run() {
    let full_dir = tempfile::tempdir().unwrap();
    let mut full = Pretrainer::create(tiny(10), full_dir.path(), &Device::Cpu).unwrap();
    let full_losses = losses(&mut full);

    // Interrupt a run planned for 10 steps after 5 (as Ctrl-C does), then resume it.
    let dir = tempfile::tempdir().unwrap();
    let mut first = Pretrainer::create(tiny(10), dir.path(), &Device::Cpu).unwrap();
    let done = std::cell::Cell::new(0);
    let mut resumed_losses = Vec::new();
    first
        .run(
            &mut |e| if let Event::Step { loss, .. } = e {
                resumed_losses.push(loss);
                done.set(done.get() + 1);
            },
            &|| done.get() >= 5,
        )
        .unwrap();
    let mut second = Pretrainer::resume(dir.path(), None, &Device::Cpu).unwrap();
    assert_eq!(second.step, 5);
    resumed_losses.extend(losses(&mut second));
    assert_eq!(full_losses.len(), 10);
    assert_eq!(full_losses, resumed_losses);
}

#[test]
fn exported_ema_policy_loads_and_refuses_to_overwrite_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = Pretrainer::create(tiny(2), dir.path(), &Device::Cpu).unwrap();
    losses(&mut run);
    let export = dir.path().join("model.safetensors");
    run.export(&export).unwrap();
    let policy = Policy::load(&export, &Device::Cpu).unwrap();
    assert_eq!(policy.config, PolicyConfig::tiny_test());
    let err = Pretrainer::create(tiny(2), dir.path(), &Device::Cpu).err().unwrap();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");
}

#[test]
fn resumed_run_writes_sample_grids_in_a_fresh_clone() {
    // The samples folder is not versioned, so a run resumed from a clone does not have it.
    let dir = tempfile::tempdir().unwrap();
    let config = PretrainConfig { sample_every: 4, ..tiny(4) };
    let mut first = Pretrainer::create(config, dir.path(), &Device::Cpu).unwrap();
    let done = std::cell::Cell::new(0);
    first.run(&mut |_| done.set(done.get() + 1), &|| done.get() >= 2).unwrap();
    let samples = dir.path().join("samples");
    if samples.exists() {
        std::fs::remove_dir_all(&samples).unwrap();
    }
    let mut second = Pretrainer::resume(dir.path(), None, &Device::Cpu).unwrap();
    losses(&mut second);
    assert!(samples.join("step_000004.png").is_file());
}

/// The conditioning probe: the shipped model's own captions remove a clear share of its
/// denoising loss (it reads its prompts); a freshly initialised model's do not.
#[test]
fn the_conditioning_gap_tells_a_model_that_reads_its_prompts() {
    use ddpo::pretrain::eval::conditioning_gap;
    let world = ddpo::world::ShapesWorld::default();
    let shipped = ddpo::family::PixelPolicy(
        ddpo::family::Policy::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-unet.safetensors"), &candle_core::Device::Cpu).unwrap(),
    );
    let trained = conditioning_gap(&shipped, &world, 32).unwrap();
    assert!(trained.gap() > 0.15 && trained.empty > trained.own, "{trained:?}");
    let fresh = ddpo::family::PixelPolicy(ddpo::family::Policy::new_random(ddpo::family::PolicyConfig::shapes_default(), 0, &candle_core::Device::Cpu).unwrap());
    let untrained = conditioning_gap(&fresh, &world, 32).unwrap();
    assert!(untrained.gap().abs() < 0.02, "{untrained:?}");

    // Per attribute: the shipped model reads the background best and every attribute somewhat;
    // an untrained one reads none.
    use ddpo::pretrain::eval::attribute_gaps;
    use ddpo::world::variants::Attribute;
    let gaps: std::collections::HashMap<Attribute, f64> = attribute_gaps(&shipped, &world, 48).unwrap().into_iter().collect();
    assert_eq!(gaps.len(), 4);
    assert!(gaps[&Attribute::Background] > 0.5, "{gaps:?}");
    assert!(gaps.values().all(|g| *g > 0.03 && *g <= gaps[&Attribute::Background]), "{gaps:?}");
    let none = attribute_gaps(&fresh, &world, 48).unwrap();
    assert!(none.iter().all(|(_, g)| g.abs() < 0.02), "{none:?}");
}

/// A tiny UNet reading the shipped shapes CLIP's text tower (64 wide, 16 tokens).
fn with_clip_text(freeze: bool) -> PretrainConfig {
    let mut policy = PolicyConfig::tiny_test();
    policy.unet.cross_attention_dim = 64;
    policy.max_tokens = 16;
    PretrainConfig {
        text_encoder_from: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-clip.safetensors")),
        freeze_text_encoder: freeze,
        policy,
        ..tiny(3)
    }
}

/// max |a - b| over the tensors both hold under the given prefixes.
fn max_change(a: &Policy, b: &std::collections::HashMap<String, candle_core::Tensor>, prefix: &str, b_prefix: &str) -> f32 {
    a.trainable_vars()
        .iter()
        .filter_map(|(name, var)| name.strip_prefix(prefix).map(|rest| (rest, var)))
        .map(|(rest, var)| {
            let other = b.get(&format!("{b_prefix}{rest}")).unwrap_or_else(|| panic!("{b_prefix}{rest} missing"));
            (var.as_tensor() - other).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn a_clip_text_tower_initialises_the_text_encoder_frozen_or_tuned() {
    let clip = candle_core::safetensors::load(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-clip.safetensors"), &Device::Cpu).unwrap();
    for freeze in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut run = Pretrainer::create(with_clip_text(freeze), dir.path(), &Device::Cpu).unwrap();
        assert_eq!(run.policy.config.text_encoder.num_hidden_layers, 2, "the CLIP's text architecture replaces the preset's");
        assert_eq!(max_change(&run.policy, &clip, "text_encoder.", ""), 0.0, "initialised from the CLIP");
        losses(&mut run);
        let text_moved = max_change(&run.policy, &clip, "text_encoder.", "");
        assert_eq!(text_moved == 0.0, freeze, "freeze {freeze}: the text encoder moved by {text_moved}");
        // The setting survives a resume.
        let resumed = Pretrainer::resume(dir.path(), Some(4), &Device::Cpu).unwrap();
        assert_eq!(resumed.config.freeze_text_encoder, freeze);
    }
}

#[test]
fn a_text_encoder_from_a_file_without_a_text_tower_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = PretrainConfig {
        text_encoder_from: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-unet.safetensors")),
        ..with_clip_text(true)
    };
    let err = format!("{:#}", Pretrainer::create(config, dir.path(), &Device::Cpu).err().unwrap());
    assert!(err.contains("shapes-unet.json") && err.contains("not a shapes CLIP config"), "{err}");
}

/// v-prediction's target, converted back through what the DDIM step takes, is the noise
/// (closed form: v = sqrt(ab) eps - sqrt(1 - ab) x0, eps = sqrt(ab) v + sqrt(1 - ab) x_t).
#[test]
fn a_v_prediction_target_converts_back_to_its_noise() {
    use ddpo::family::ddpm::schedule::{NoiseSchedule, ScheduleConfig};
    let schedule = NoiseSchedule::new(ScheduleConfig { prediction_type: "v_prediction".into(), ..ScheduleConfig::pixel_default() }).unwrap();
    let mut rng = ddpo::sampler::NoiseRng::new(3);
    let x0 = rng.randn((3, 3, 4, 4), &Device::Cpu).unwrap();
    let noise = rng.randn((3, 3, 4, 4), &Device::Cpu).unwrap();
    let t = [0, 500, 999];
    let x_t = schedule.add_noise(&x0, &noise, &t).unwrap();
    let v = schedule.training_target(&x0, &noise, &t).unwrap();
    // At t = 999 (ab ~ 4e-5) v is almost -x0; at t = 0 almost the noise.
    let ab = schedule.alpha_bar(999);
    let expected = (noise.get(2).unwrap() * ab.sqrt()).unwrap() - (x0.get(2).unwrap() * (1.0 - ab).sqrt()).unwrap();
    let err = (v.get(2).unwrap() - expected.unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err < 1e-6, "v at t=999 off by {err}");
    let eps = schedule.eps_from_output(v, &x_t, &t).unwrap();
    let err = (eps - &noise).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err < 1e-5, "eps recovered from v off by {err}");
    let bad = ScheduleConfig { prediction_type: "sample".into(), ..ScheduleConfig::pixel_default() };
    assert!(format!("{:#}", NoiseSchedule::new(bad).err().unwrap()).contains("v_prediction"));
}

#[test]
fn a_run_starts_from_a_models_weights_and_learns_v_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Pretrainer::create(tiny(20), dir.path(), &Device::Cpu).unwrap();
    losses(&mut first);
    let start = dir.path().join("start.safetensors");
    first.export(&start).unwrap();
    let exported = candle_core::safetensors::load(&start, &Device::Cpu).unwrap();

    let mut config = tiny(80);
    config.policy.scheduler.prediction_type = "v_prediction".into();
    config.init_from = Some(start.clone());
    let run_dir = dir.path().join("v");
    let mut run = Pretrainer::create(config, &run_dir, &Device::Cpu).unwrap();
    assert_eq!(max_change(&run.policy, &exported, "", ""), 0.0, "starts from the given weights");
    let l = losses(&mut run);
    let (first5, last5) = (l[..5].iter().sum::<f64>() / 5.0, l[l.len() - 5..].iter().sum::<f64>() / 5.0);
    assert!(last5 < 0.8 * first5, "v-prediction loss went from {first5:.3} to {last5:.3}");

    // Weights of another architecture are refused, naming the file.
    let mut other = tiny(2);
    other.policy.unet.block_out_channels = vec![8, 16];
    other.init_from = Some(start);
    let err = format!("{:#}", Pretrainer::create(other, &dir.path().join("w"), &Device::Cpu).err().unwrap());
    assert!(err.contains("start.safetensors") && err.contains("architecture"), "{err}");
}

#[test]
fn a_run_grows_a_model_by_attention_blocks_that_start_as_the_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Pretrainer::create(tiny(10), dir.path(), &Device::Cpu).unwrap();
    losses(&mut first);
    let start = dir.path().join("start.safetensors");
    first.export(&start).unwrap();
    let small = Policy::load(&start, &Device::Cpu).unwrap();

    // The same model with cross-attention at its first (16x16) level as well, and the pooled
    // caption in its timestep embedding (`--arch v4`'s addition).
    let mut config = tiny(10);
    config.policy.unet.down_block_types = vec!["CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into()];
    config.policy.unet.up_block_types = vec!["CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into()];
    config.policy.unet.addition_embed_type = Some("text".into());
    config.policy.unet.addition_embed_type_num_heads = 4;
    config.init_from = Some(start.clone());
    let mut grown = Pretrainer::create(config, &dir.path().join("grown"), &Device::Cpu).unwrap();
    assert!(grown.policy.parameter_count() > small.parameter_count());

    let x = ddpo::sampler::NoiseRng::new(3).randn((2, 3, 16, 16), &Device::Cpu).unwrap();
    let context = small.encode_prompts(&["a red circle on a blue background", "two green stars on a white background"]).unwrap();
    let predict = |p: &Policy| p.predict_eps(&x, &[700, 100], &context).unwrap();
    let diff = (predict(&small) - predict(&grown.policy)).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "the grown model's first prediction differs from the old one's by {diff}");

    // Training then moves the new blocks' zeroed outputs off zero.
    losses(&mut grown);
    for zeroed in ["unet.down_blocks.0.attentions.0.proj_out.weight", "unet.add_embedding.norm2.weight"] {
        let var = grown.policy.trainable_vars().into_iter().find(|(n, _)| n == zeroed).unwrap().1;
        let norm = var.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{zeroed} never trained");
    }

    // A file with tensors the policy lacks is refused, naming the stray tensor.
    let mut shrunk = tiny(2);
    shrunk.policy.unet.down_block_types = vec!["DownBlock2D".into(), "DownBlock2D".into()];
    shrunk.policy.unet.up_block_types = vec!["UpBlock2D".into(), "UpBlock2D".into()];
    shrunk.init_from = Some(start);
    let err = format!("{:#}", Pretrainer::create(shrunk, &dir.path().join("shrunk"), &Device::Cpu).err().unwrap());
    assert!(err.contains("attentions") && err.contains("lacks"), "{err}");
}

/// A flow model always predicts its velocity: the flags refuse a prediction type beside it.
#[test]
fn a_flow_model_refuses_a_prediction_type() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpo"))
        .args(["pretrain", "diffusion", "--flow-shift", "3", "--prediction", "v", "--out", "/nonexistent/never-made"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--prediction") && stderr.contains("--flow-shift"), "{stderr}");
}
