//! The small shapes-world CLIP and its reward plumbing: forward shapes and gradients to every
//! parameter, a contrastive step that lowers the loss, the zero-shot evaluation, save/load with
//! errors naming the tensor, the composition score, and the script primitives `clip_similarity`
//! and `aesthetic` through the engine with one batched embedding pass.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddpo::optim::{AdamW, AdamWConfig};
use ddpo::family::unet::init::seeded_var_builder;
use ddpo::pretrain::aesthetic::{load_head, save_head, AestheticHeadConfig};
use ddpo::pretrain::clip::zero_shot;
use ddpo::reward::aesthetic::AestheticMlp;
use ddpo::reward::models::{LazyModels, RewardModels};
use ddpo::reward::shapes_clip::{ShapesClip, ShapesClipConfig};
use ddpo::reward::Reward;
use ddpo::script::{Limits, ScriptSet};
use ddpo::world::variants::{variants, Attribute};
use ddpo::world::{composition, parse_caption, ShapesWorld, WorldConfig, WorldSample};

fn tiny(seed: u64) -> (ShapesClip, VarMap) {
    let varmap = VarMap::new();
    let model = ShapesClip::new(&ShapesClipConfig::tiny_test(), seeded_var_builder(&varmap, seed, &Device::Cpu)).unwrap();
    (model, varmap)
}

fn samples(seed: u64, n: usize) -> Vec<WorldSample> {
    ShapesWorld::new(WorldConfig { size: 16, ..Default::default() }).unwrap().batch(seed, n)
}

fn vars(varmap: &VarMap) -> Vec<(String, candle_core::Var)> {
    varmap.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

#[test]
fn forward_shapes_and_gradients_reach_every_parameter() {
    let (model, varmap) = tiny(0);
    let batch = samples(1, 6);
    let imgs: Vec<_> = batch.iter().map(|s| &s.image).collect();
    let caps: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
    let ie = model.image_embeddings(&imgs).unwrap();
    let te = model.text_embeddings(&caps).unwrap();
    assert_eq!(ie.dims(), &[6, 16]);
    assert_eq!(te.dims(), &[6, 16]);
    let norms = ie.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "{norms:?}");
    // A 32x32 image is resized to the model's 16x16.
    let big = ShapesWorld::default().batch(0, 1);
    assert_eq!(model.image_embeddings(&[&big[0].image]).unwrap().dims(), &[1, 16]);

    let loss = model.contrastive_loss(&imgs, &caps, &["a red circle on a blue background"]).unwrap();
    let grads = loss.backward().unwrap();
    let all = vars(&varmap);
    assert!(all.len() > 20, "{}", all.len());
    for (name, var) in all {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reaches {name}"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "gradient of {name} has squared norm {norm}");
    }
}

#[test]
fn contrastive_steps_lower_the_loss_on_a_fixed_batch() {
    let (model, varmap) = tiny(2);
    let batch = samples(3, 8);
    let imgs: Vec<_> = batch.iter().map(|s| &s.image).collect();
    let caps: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
    let mut opt = AdamW::new(vars(&varmap), AdamWConfig { lr: 3e-3, ..Default::default() }).unwrap();
    let first = model.contrastive_loss(&imgs, &caps, &[]).unwrap();
    let start = first.to_scalar::<f32>().unwrap();
    assert!(start.is_finite() && start > 1.0, "initial loss {start}");
    opt.step(&opt.collect(&first.backward().unwrap())).unwrap();
    for _ in 0..7 {
        let loss = model.contrastive_loss(&imgs, &caps, &[]).unwrap();
        opt.step(&opt.collect(&loss.backward().unwrap())).unwrap();
    }
    let end = model.contrastive_loss(&imgs, &caps, &[]).unwrap().to_scalar::<f32>().unwrap();
    assert!(end < start - 0.3, "loss went from {start} to {end}");
}

#[test]
fn variants_differ_in_exactly_one_attribute() {
    for s in samples(4, 40) {
        for a in Attribute::ALL {
            for v in variants(&s.spec, a) {
                let parsed = parse_caption(&v.caption()).unwrap_or_else(|| panic!("{:?} does not parse", v.caption()));
                assert_eq!(parsed, v);
                assert_ne!(v, s.spec);
                let mut back = v.clone();
                match a {
                    Attribute::Colour => back.shapes[0].colour = s.spec.shapes[0].colour,
                    Attribute::Shape => back.shapes[0].kind = s.spec.shapes[0].kind,
                    Attribute::Count => back.shapes[0].count = s.spec.shapes[0].count,
                    Attribute::Background => back.background[0] = s.spec.background[0],
                }
                assert_eq!(back, s.spec, "{a:?} variant {:?} of {:?}", v.caption(), s.caption);
            }
        }
    }
}

#[test]
fn zero_shot_counts_every_question_once() {
    let (model, _) = tiny(5);
    let batch = samples(6, 12);
    let r = zero_shot(&model, &batch).unwrap();
    assert_eq!(r.images, 12);
    let single = batch.iter().filter(|s| s.spec.shapes.len() == 1).count();
    assert_eq!((r.colour.total, r.shape.total, r.count.total, r.background.total), (12, 12, single, 12));
    assert_eq!(r.shape.mean_candidates, 7.0);
    let expected_bg: usize = batch.iter().map(|s| 1 + variants(&s.spec, Attribute::Background).len()).sum();
    assert!((r.background.mean_candidates - expected_bg as f64 / 12.0).abs() < 1e-9);
    for a in [&r.colour, &r.shape, &r.count, &r.background] {
        assert!((a.accuracy - a.correct as f64 / a.total as f64).abs() < 1e-12);
    }
    // An untrained model is near chance on shape (1 in 7), far from the 90% target.
    assert!(r.shape.accuracy < 0.6, "{r:?}");
}

#[test]
fn save_load_roundtrip_and_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (model, varmap) = tiny(7);
    let path = dir.path().join("clip.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> =
        vars(&varmap).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    ShapesClip::save(model.config(), &tensors, &path).unwrap();
    let loaded = ShapesClip::load(&path, &Device::Cpu).unwrap();
    let batch = samples(8, 3);
    let imgs: Vec<_> = batch.iter().map(|s| &s.image).collect();
    let a = model.image_embeddings(&imgs).unwrap();
    let b = loaded.image_embeddings(&imgs).unwrap();
    assert!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-6);

    let name = "vision.stages.1.conv.weight";
    let mut wrong = tensors.clone();
    wrong.insert(name.into(), Tensor::zeros((16, 8, 5, 5), DType::F32, &Device::Cpu).unwrap());
    ShapesClip::save(model.config(), &wrong, &path).unwrap();
    let e = format!("{:#}", ShapesClip::load(&path, &Device::Cpu).unwrap_err());
    assert!(e.contains(name) && e.contains("[16, 8, 3, 3]") && e.contains("clip.safetensors"), "{e}");
    let mut missing = tensors.clone();
    missing.remove("text_projection.weight");
    ShapesClip::save(model.config(), &missing, &path).unwrap();
    let e = format!("{:#}", ShapesClip::load(&path, &Device::Cpu).unwrap_err());
    assert!(e.contains("text_projection.weight"), "{e}");
}

#[test]
fn composition_prefers_centred_contrasting_scenes() {
    let batch = ShapesWorld::default().batch(9, 64);
    let scores: Vec<f64> = batch.iter().map(|s| composition(&s.scene).total).collect();
    assert!(scores.iter().all(|s| (0.0..=10.0).contains(s)));
    assert_eq!(composition(&batch[0].scene), composition(&batch[0].scene.clone()));
    let spread = scores.iter().cloned().fold(f64::MIN, f64::max) - scores.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 2.0, "scores barely vary: {scores:?}");
    // Moving a single shape from the centre to a corner loses the centring part.
    let mut scene = batch.iter().find(|s| s.scene.shapes.len() == 1).unwrap().scene.clone();
    scene.shapes[0].centre = (16.0, 16.0);
    let centred = composition(&scene);
    scene.shapes[0].centre = (6.0, 6.0);
    let corner = composition(&scene);
    assert_eq!(centred.centring, 1.0);
    assert!(corner.centring < 0.1 && corner.total < centred.total - 2.5, "{centred:?} vs {corner:?}");
}

#[test]
fn aesthetic_head_roundtrips_with_its_input_width() {
    let dir = tempfile::tempdir().unwrap();
    let varmap = VarMap::new();
    let mlp = AestheticMlp::new(16, seeded_var_builder(&varmap, 1, &Device::Cpu)).unwrap();
    let path = dir.path().join("head.safetensors");
    let cfg = AestheticHeadConfig { input_dim: 16, clip: "clip.safetensors".into(), target: "test".into(), train: Default::default() };
    save_head(&varmap, &cfg, &path).unwrap();
    let loaded = load_head(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.input_dim(), 16);
    let x = Tensor::ones((2, 16), DType::F32, &Device::Cpu).unwrap();
    let (a, b) = (mlp.score(&x).unwrap().to_vec1::<f32>().unwrap(), loaded.score(&x).unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(a, b);
}

#[test]
fn script_primitives_use_the_configured_models_with_one_batched_pass() {
    let (clip, _) = tiny(11);
    let head = AestheticMlp::new(16, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)).unwrap();
    let models = Arc::new(RewardModels::from_shapes(clip.clone(), Some(head.clone())));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("r.rhai");
    std::fs::write(
        &script,
        "fn reward(img, prompt, meta) {\n\
           let s = clip_similarity(img, prompt);\n\
           let both = clip_similarity(img, [prompt, \"a red circle on a blue background\"]);\n\
           #{ total: s, again: both[0], other: both[1], beauty: aesthetic(img) }\n\
         }",
    )
    .unwrap();
    let mut set = ScriptSet::new(Limits::default(), Arc::new(|_: &str| {})).with_models(LazyModels::ready(models.clone()));
    let reward = set.load_reward(&script).unwrap();
    let after_dry_run = models.images_embedded.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after_dry_run, 4, "the dry run embeds its 4 images in one pass");

    let batch = samples(12, 5);
    let images: Vec<_> = batch.iter().map(|s| s.image.clone()).collect();
    let prompts: Vec<String> = batch.iter().map(|s| s.caption.clone()).collect();
    let scores = reward.score(&images, &prompts).unwrap();
    assert_eq!(models.images_embedded.load(std::sync::atomic::Ordering::Relaxed), after_dry_run + 5);
    reward.score(&images, &prompts).unwrap();
    assert_eq!(models.images_embedded.load(std::sync::atomic::Ordering::Relaxed), after_dry_run + 5, "second pass hits the cache");

    let refs: Vec<_> = images.iter().collect();
    let ie = clip.image_embeddings(&refs).unwrap().to_vec2::<f32>().unwrap();
    let te = clip.text_embeddings(&prompts.iter().map(String::as_str).collect::<Vec<_>>()).unwrap().to_vec2::<f32>().unwrap();
    let beauty = head.score(&clip.image_embeddings(&refs).unwrap()).unwrap().to_vec1::<f32>().unwrap();
    for (i, s) in scores.iter().enumerate() {
        let direct: f32 = ie[i].iter().zip(&te[i]).map(|(a, b)| a * b).sum();
        assert!((s.total - direct as f64).abs() < 1e-5, "sample {i}: {} vs {direct}", s.total);
        assert!((s.components["again"] - s.total).abs() < 1e-9);
        assert!(s.components["other"].abs() <= 1.0 + 1e-6);
        assert!((s.components["beauty"] - beauty[i] as f64).abs() < 1e-4);
    }
}

#[test]
fn clip_training_resumes_exactly() {
    use ddpo::pretrain::clip::{ClipTrainConfig, ClipTrainer};
    let config = ClipTrainConfig {
        steps: 3,
        batch_size: 4,
        checkpoint_every: 2,
        model: ShapesClipConfig::tiny_test(),
        ..Default::default()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut whole = ClipTrainer::create(config.clone(), a.path(), &Device::Cpu).unwrap();
    whole.run(&mut |_| {}, &|| false).unwrap();
    let mut first = ClipTrainer::create(config, b.path(), &Device::Cpu).unwrap();
    // The stop flag is polled once before each step: let exactly two run.
    let polls = std::cell::Cell::new(0);
    first.run(&mut |_| {}, &|| { polls.set(polls.get() + 1); polls.get() > 2 }).unwrap();
    drop(first);
    let mut resumed = ClipTrainer::resume(b.path(), None, &Device::Cpu).unwrap();
    assert_eq!(resumed.step, 2);
    resumed.run(&mut |_| {}, &|| false).unwrap();
    let (wa, wb) = (whole.weights(), resumed.weights());
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        let d = (t - &wb[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d == 0.0, "{name} differs by {d} after resuming");
    }
    // The exported weights load as a model.
    ShapesClip::load(&b.path().join("clip.safetensors"), &Device::Cpu).unwrap();
}

