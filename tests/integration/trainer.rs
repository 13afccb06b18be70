//! DDPO on tiny configs: hand-checked advantages and losses, ratio 1 before any update, and a
//! trivially learnable reward (mean brightness) that rises under IS, SF and RWR.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use ddpo::ddpo::loss::ppo_clip_loss;
use ddpo::ddpo::{Algorithm, FixedPrompts, Normalisation, StatTracker, TrainConfig, Trainer};
use ddpo::optim::AdamWConfig;
use ddpo::family::{PixelPolicy, Policy, PolicyConfig};
use ddpo::pretrain::{PretrainConfig, Pretrainer};
use ddpo::reward::Brightness;
use ddpo::family::SamplerConfig;

#[test]
fn per_prompt_stat_tracker_matches_hand_computation() {
    let mut st = StatTracker::default();
    let how = Normalisation::PerPrompt { buffer_size: 4, min_count: 3 };
    let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // "a" has 3 rewards (>= min_count): its own stats; "b" has 1: batch stats.
    let adv = st.advantages(&p(&["a", "a", "b", "a"]), &[1.0, 2.0, 10.0, 3.0], how);
    let (ma, sa) = (2.0, (2.0f64 / 3.0).sqrt());
    let batch_mean = 4.0;
    let batch_std = ((9.0 + 4.0 + 36.0 + 1.0) / 4.0f64).sqrt();
    let want = [(1.0 - ma) / (sa + 1e-6), 0.0, (10.0 - batch_mean) / (batch_std + 1e-6), (3.0 - ma) / (sa + 1e-6)];
    for (a, w) in adv.iter().zip(want) {
        assert!((a - w).abs() < 1e-9, "{adv:?} vs {want:?}");
    }
    // The buffer keeps the last 4 rewards of "a": [2, 3, 5, 7] after adding 5 and 7.
    let adv = st.advantages(&p(&["a", "a"]), &[5.0, 7.0], how);
    let (m, s) = (17.0 / 4.0, ((2.25f64 * 2.25 + 1.25 * 1.25 + 0.75 * 0.75 + 2.75 * 2.75) / 4.0).sqrt());
    assert!((adv[0] - (5.0 - m) / (s + 1e-6)).abs() < 1e-9);
    assert!((adv[1] - (7.0 - m) / (s + 1e-6)).abs() < 1e-9);
}

#[test]
fn clipped_objective_matches_hand_computation() {
    let d = Device::Cpu;
    let new = Tensor::new(&[0.0f32, 0.3, -0.3, 0.05], &d).unwrap();
    let old = Tensor::new(&[0.0f32, 0.0, 0.0, 0.0], &d).unwrap();
    let adv = Tensor::new(&[1.0f32, 1.0, -2.0, -1.0], &d).unwrap();
    let eps = 0.1;
    let l = ppo_clip_loss(&new, &old, &adv, eps).unwrap();
    let mut want = 0.0;
    let mut clipped = 0.0;
    for (n, a) in [(0.0f64, 1.0f64), (0.3, 1.0), (-0.3, -2.0), (0.05, -1.0)] {
        let r = n.exp();
        want += f64::max(-a * r, -a * r.clamp(1.0 - eps, 1.0 + eps)) / 4.0;
        clipped += ((r - 1.0).abs() > eps) as u8 as f64 / 4.0;
    }
    let got = l.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    assert!((l.clipfrac - clipped).abs() < 1e-9);
    let kl = 0.5 * (0.09 + 0.09 + 0.0025) / 4.0;
    assert!((l.approx_kl - kl).abs() < 1e-6);
}

/// A tiny policy briefly pretrained on the shapes world (so it is a denoiser, as in real use),
/// shared by the tests of this file.
fn pretrained_weights() -> &'static Vec<(String, Tensor)> {
    static WEIGHTS: std::sync::OnceLock<Vec<(String, Tensor)>> = std::sync::OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PretrainConfig {
            steps: 60,
            batch_size: 16,
            lr: 3e-3,
            warmup: 5,
            checkpoint_every: 1000,
            sample_every: 0,
            policy: PolicyConfig::tiny_test(),
            ..Default::default()
        };
        let mut run = Pretrainer::create(cfg, dir.path(), &Device::Cpu).unwrap();
        run.run(&mut |_| {}, &|| false).unwrap();
        run.policy.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().copy().unwrap())).collect()
    })
}

fn tiny_trainer(algorithm: Algorithm, lr: f64) -> Trainer {
    tiny_trainer_with(algorithm, lr, Arc::new(Brightness))
}

fn tiny_trainer_with(algorithm: Algorithm, lr: f64, reward: Arc<dyn ddpo::reward::Reward>) -> Trainer {
    tiny_trainer_edited(algorithm, lr, reward, |_| {})
}

/// A trainable copy of the tiny pretrained policy.
fn tiny_policy() -> PixelPolicy {
    let varmap = candle_nn::VarMap::new();
    for (name, t) in pretrained_weights() {
        varmap.data().lock().unwrap().insert(name.clone(), candle_core::Var::from_tensor(t).unwrap());
    }
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    PixelPolicy(Policy::from_var_builder(PolicyConfig::tiny_test(), vb, Some(varmap), &Device::Cpu).unwrap())
}

fn tiny_trainer_edited(algorithm: Algorithm, lr: f64, reward: Arc<dyn ddpo::reward::Reward>, edit: impl FnOnce(&mut TrainConfig)) -> Trainer {
    let policy = tiny_policy();
    let config = TrainConfig {
        algorithm,
        samples_per_epoch: 32,
        sample_batch_size: 16,
        train_batch_size: 16,
        inner_epochs: 1,
        clip_range: 0.2,
        rwr_beta: 0.2,
        normalisation: Normalisation::Batch,
        optimizer: AdamWConfig { lr, ..Default::default() },
        sampler: SamplerConfig::new(4, 1.0, 1.0),
        seed: 3,
        // The tiny model is pretrained for 60 steps only: its brightness follows the prompt
        // embedding more than the UNet, so these tests train both (unlike `ddpo train`'s default),
        // and with 4 sampling steps every step is trained.
        train_text_encoder: true,
        min_train_sigma: 0.0,
        ..Default::default()
    };
    let mut config = config;
    edit(&mut config);
    let prompts = FixedPrompts(vec!["a red circle on a blue background".into(), "a white square on a black background".into()]);
    Trainer::new(config, Box::new(policy), reward, Box::new(prompts)).unwrap()
}

/// Mean brightness of 32 images sampled with fixed noise (a paired before/after comparison).
fn eval_brightness(t: &Trainer) -> f64 {
    let prompts = vec!["a red circle on a blue background".to_string(); 32];
    let images = ddpo::sampler::sample_images(t.policy(), &prompts, &t.config().sampler, 99, 32).unwrap();
    images.iter().map(ddpo::reward::stats::mean_brightness).sum::<f64>() / images.len() as f64
}

fn brightness_gain(algorithm: Algorithm, lr: f64, epochs: usize) -> (f64, f64) {
    let mut t = tiny_trainer(algorithm, lr);
    let before = eval_brightness(&t);
    let first = t.run_epoch().unwrap();
    assert!(first.first_ratio_max_dev < 1e-5, "ratio before any update deviates from 1 by {}", first.first_ratio_max_dev);
    for _ in 1..epochs {
        t.run_epoch().unwrap();
    }
    let after = eval_brightness(&t);
    println!("{algorithm:?}: brightness {before:.3} -> {after:.3}");
    (before, after)
}

#[test]
fn brightness_rises_with_ddpo_is() {
    let (before, after) = brightness_gain(Algorithm::Is, 3e-3, 6);
    assert!(after > before + 0.02, "IS: brightness {before:.3} -> {after:.3}");
}

#[test]
fn brightness_rises_with_ddpo_sf() {
    let (before, after) = brightness_gain(Algorithm::Sf, 1e-2, 6);
    assert!(after > before + 0.02, "SF: brightness {before:.3} -> {after:.3}");
}

#[test]
fn brightness_rises_with_rwr() {
    let (before, after) = brightness_gain(Algorithm::Rwr, 3e-3, 6);
    assert!(after > before + 0.02, "RWR: brightness {before:.3} -> {after:.3}");
}

/// A reward script written against the documented API alone (tests/fixtures/scripts) trains:
/// its reward, as the script itself scores fixed-noise samples, rises over a short run.
#[test]
fn a_scripted_reward_rises() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scripts/mean_rgb_brightness.rhai");
    let reward = Arc::new(ddpo::script::ScriptSet::new(Default::default(), Arc::new(|_: &str| {})).load_reward(&path).unwrap());
    let mut t = tiny_trainer_with(Algorithm::Is, 3e-3, reward.clone());
    let score = |t: &Trainer| -> f64 {
        let prompts = vec!["a red circle on a blue background".to_string(); 32];
        let images = ddpo::sampler::sample_images(t.policy(), &prompts, &t.config().sampler, 99, 32).unwrap();
        let scores = ddpo::reward::Reward::score(&*reward, &images, &prompts).unwrap();
        assert!(scores.iter().all(|s| s.components.len() == 3));
        scores.iter().map(|s| s.total).sum::<f64>() / scores.len() as f64
    };
    let before = score(&t);
    for _ in 0..6 {
        t.run_epoch().unwrap();
    }
    let after = score(&t);
    println!("scripted reward {before:.3} -> {after:.3}");
    assert!(after > before + 0.02, "scripted reward {before:.3} -> {after:.3}");
}

/// Names of the policy's weights that one epoch of training changed.
fn changed_by_one_epoch(mut t: Trainer) -> Vec<String> {
    let snapshot = |t: &Trainer| -> Vec<(String, Vec<f32>)> {
        t.policy().trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
    };
    let before = snapshot(&t);
    t.run_epoch().unwrap();
    before.into_iter().zip(snapshot(&t)).filter(|(a, b)| a.1 != b.1).map(|(a, _)| a.0).collect()
}

#[test]
fn the_text_encoder_is_frozen_unless_asked() {
    let t = tiny_trainer_edited(Algorithm::Sf, 1e-2, Arc::new(Brightness), |c| c.train_text_encoder = false);
    let changed = changed_by_one_epoch(t);
    assert!(changed.iter().any(|n| n.starts_with("unet.")), "no UNet weight moved");
    assert!(changed.iter().all(|n| !n.starts_with("text_encoder.")), "text encoder moved: {changed:?}");
    let t = tiny_trainer_edited(Algorithm::Sf, 1e-2, Arc::new(Brightness), |c| c.train_text_encoder = true);
    let changed = changed_by_one_epoch(t);
    assert!(changed.iter().any(|n| n.starts_with("text_encoder.")), "--train-text-encoder left it untouched");
}

#[test]
fn train_only_moves_just_the_matching_weights() {
    let t = tiny_trainer_edited(Algorithm::Sf, 1e-2, Arc::new(Brightness), |c| c.train_only = vec!["attn2.to_k".into(), "attn2.to_v".into()]);
    let changed = changed_by_one_epoch(t);
    assert!(!changed.is_empty(), "no weight moved");
    assert!(changed.iter().all(|n| n.contains("attn2.to_k") || n.contains("attn2.to_v")), "other weights moved: {changed:?}");
    let policy = tiny_policy();
    let config = TrainConfig { train_only: vec!["no_such_layer".into()], ..Default::default() };
    let err = Trainer::new(config, Box::new(policy), Arc::new(Brightness), Box::new(FixedPrompts(vec!["a red circle on a blue background".into()])))
        .err()
        .expect("a pattern matching nothing must be refused");
    assert!(err.to_string().contains("no_such_layer"), "{err}");
}

#[test]
fn range_penalty_matches_hand_computation_and_is_flat_inside_the_range() {
    let d = Device::Cpu;
    let x = candle_core::Var::new(&[[0.5f32, -1.5], [2.0, -0.9]], &d).unwrap();
    let w = Tensor::new(&[1.0f32, 0.25], &d).unwrap();
    let p = ddpo::ddpo::range_excess(x.as_tensor(), 1.0, &w).unwrap();
    // Rows: mean(0, 0.5^2) = 0.125 with weight 1; mean(1^2, 0) = 0.5 with weight 0.25.
    let want = (0.125 + 0.125) / 2.0;
    assert!((p.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
    let g = p.backward().unwrap().get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    // d/dx of w_i * relu(|x| - 1)^2 / (2 cols * 2 rows): zero inside, sign(x) * 2 * excess outside.
    assert_eq!(g[0][0], 0.0);
    assert_eq!(g[1][1], 0.0);
    assert!((g[0][1] - (-2.0 * 0.5 / 4.0)).abs() < 1e-6, "{g:?}");
    assert!((g[1][0] - (0.25 * 2.0 * 1.0 / 4.0)).abs() < 1e-6, "{g:?}");
}

/// The same reward for every image: zero advantages, so only the range penalty moves the policy.
struct Constant;

impl ddpo::reward::Reward for Constant {
    fn name(&self) -> &str {
        "constant"
    }
    fn score(&self, images: &[image::RgbImage], _: &[String]) -> anyhow::Result<Vec<ddpo::reward::Score>> {
        Ok(images.iter().map(|_| ddpo::reward::Score::new(1.0)).collect())
    }
}

/// With nothing to gain from the reward, the penalty alone pulls predicted x0 back into [-1, 1].
#[test]
fn the_range_penalty_pulls_predictions_into_range() {
    let mut t = tiny_trainer_edited(Algorithm::Is, 1e-3, Arc::new(Constant), |c| c.range_penalty = 100.0);
    let first = t.run_epoch().unwrap();
    assert!(first.x0_excess > 0.0, "the tiny model's x0 starts in range; the test needs one that does not");
    let mut last = first.clone();
    for _ in 0..5 {
        last = t.run_epoch().unwrap();
    }
    println!("x0 excess {:.4} -> {:.4}, out of range {:.3} -> {:.3}", first.x0_excess, last.x0_excess, first.out_of_range, last.out_of_range);
    assert!(last.x0_excess < 0.75 * first.x0_excess, "x0 excess {} -> {}", first.x0_excess, last.x0_excess);
}

/// For two Gaussians with the same sigma, log p(x) - log q(x) at x = mean_p is exactly
/// KL(p || q) = |mean_p - mean_q|^2 / (2 sigma^2): `kl_to_base` against the sampler's own
/// log-densities.
#[test]
fn kl_to_base_is_the_log_density_gap_at_the_policy_mean() {
    use ddpo::family::ddpm::{ddim_step, NoiseSchedule, ScheduleConfig};
    let d = Device::Cpu;
    let schedule = NoiseSchedule::new(ScheduleConfig { clip_sample: false, ..ScheduleConfig::pixel_default() }).unwrap();
    let (t, steps) = (vec![601usize, 301], 10);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &d).unwrap();
    let eps_p = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &d).unwrap();
    let eps_q = (&eps_p + Tensor::randn(0f32, 0.3, (2, 3, 4, 4), &d).unwrap()).unwrap();
    let dummy = x.zeros_like().unwrap();
    let p = ddim_step(&schedule, &eps_p, &t, &x, steps, 1.0, Some(&dummy), None).unwrap();
    let q = ddim_step(&schedule, &eps_q, &t, &x, steps, 1.0, Some(&dummy), None).unwrap();
    let at_mean = |eps: &Tensor| ddim_step(&schedule, eps, &t, &x, steps, 1.0, Some(&p.mean), None).unwrap().log_prob;
    let gap = (at_mean(&eps_p) - at_mean(&eps_q)).unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let kl = ddpo::ddpo::kl_to_base(&p, &q).unwrap().to_scalar::<f32>().unwrap();
    assert!(kl > 1e-4, "the two steps should differ: kl {kl}");
    assert!((kl - gap).abs() < 1e-4 * kl.max(1.0), "kl {kl} vs log-density gap {gap}");
}

/// The frozen pretrained policy, as `ddpo train --kl-weight` loads the shipped model.
fn frozen_base() -> Box<PixelPolicy> {
    let tensors = pretrained_weights().iter().cloned().collect();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
    Box::new(PixelPolicy(Policy::from_var_builder(PolicyConfig::tiny_test(), vb, None, &Device::Cpu).unwrap()))
}

/// A heavily weighted KL term keeps the policy much closer to the base (in the KL the trainer
/// measures) than a run where the term is weighted too little to matter; without a base model
/// it is an error.
#[test]
fn the_kl_term_keeps_the_policy_near_the_base() {
    let kl_after = |kl_weight: f64| {
        let mut t = tiny_trainer_edited(Algorithm::Is, 3e-4, Arc::new(Brightness), |c| c.kl_weight = kl_weight);
        t.set_base(frozen_base());
        let reports: Vec<_> = (0..4).map(|_| t.run_epoch().unwrap()).collect();
        reports.iter().map(|r| r.kl_base).collect::<Vec<_>>()
    };
    let free = kl_after(1e-9);
    let held = kl_after(1e4);
    println!("KL to the base per epoch: {free:?} nearly free, {held:?} with the KL term");
    assert!(free[3] > 0.0 && held[3] > 0.0);
    assert!(held[3] < 0.5 * free[3], "KL {} with the term vs {} without", held[3], free[3]);

    let mut t = tiny_trainer_edited(Algorithm::Is, 1e-3, Arc::new(Brightness), |c| c.kl_weight = 1.0);
    let err = format!("{:#}", t.run_epoch().unwrap_err());
    assert!(err.contains("kl_weight needs the base model"), "{err}");
}
