//! Group-relative training: advantages within prompt groups against a hand computation, groups
//! without signal carry no weight, same-noise groups share x_T, a trained-step window, and the KL
//! term is zero at the reference.

use crate::common;

use std::sync::Arc;

use common::fixtures::{prompt_pair, prompt_source, small_config, tiny_family};
use ddpo::ddpo::{group_advantages, Normalisation, TrainConfig, Trainer};
use ddpo::family::{Family, NoiseRng, SamplerConfig};
use ddpo::reward::{Reward, Score};
use ddpo::sampler;

#[test]
fn group_advantages_match_a_hand_computation() {
    let rewards = [1.0, 3.0, 2.0, 2.0, 0.0, 4.0];
    let g = group_advantages(&rewards, 2, false);
    // Groups (1, 3), (2, 2), (0, 4): means 2, 2, 2; stds 1, 0, 2.
    let want = [-1.0 / (1.0 + 1e-6), 1.0 / (1.0 + 1e-6), 0.0, 0.0, -2.0 / (2.0 + 1e-6), 2.0 / (2.0 + 1e-6)];
    for (a, w) in g.advantages.iter().zip(want) {
        assert!((a - w).abs() < 1e-12, "{:?}", g.advantages);
    }
    assert_eq!((g.zero_std_groups, g.groups), (1, 3));
    assert!((g.zero_std_ratio() - 1.0 / 3.0).abs() < 1e-12);
    // With the batch's std instead of each group's: mean 2, squared deviations 1 1 0 0 4 4.
    let global = group_advantages(&rewards, 2, true);
    let s = (10.0f64 / 6.0).sqrt() + 1e-6;
    assert!((global.advantages[0] + 1.0 / s).abs() < 1e-12 && (global.advantages[5] - 2.0 / s).abs() < 1e-12, "{:?}", global.advantages);
    assert_eq!(global.advantages[2..4], [0.0, 0.0]);
}

/// The same reward for the two samples of a group, a different one across groups.
struct ByPrompt;

impl Reward for ByPrompt {
    fn name(&self) -> &str {
        "by-prompt"
    }
    fn score(&self, images: &[image::RgbImage], prompts: &[String]) -> anyhow::Result<Vec<Score>> {
        Ok(images.iter().zip(prompts).map(|(_, p)| Score::new(p.len() as f64)).collect())
    }
}

fn grouped(reward: Arc<dyn Reward>, edit: impl FnOnce(&mut TrainConfig)) -> Trainer {
    let mut config = TrainConfig { group_size: 2, same_noise: true, normalisation: Normalisation::Group { global_std: false }, ..small_config() };
    edit(&mut config);
    Trainer::new(config, tiny_family(1), reward, prompt_source()).unwrap()
}

#[test]
fn groups_without_signal_carry_no_weight() {
    let mut t = grouped(Arc::new(ByPrompt), |_| {});
    let report = t.run_epoch().unwrap();
    assert_eq!(report.zero_std_ratio, 1.0);
    // Every advantage is 0, so the policy-gradient loss is 0 whatever the ratios.
    assert_eq!(report.loss, 0.0);
    // Each group is one prompt, twice in a row.
    for pair in report.prompts.chunks(2) {
        assert_eq!(pair[0], pair[1]);
    }
}

#[test]
fn same_noise_groups_share_their_start_and_differ_after_it() {
    let family = tiny_family(3);
    let prompts: Vec<String> = prompt_pair().iter().flat_map(|p| [p.clone(), p.clone()]).collect();
    let cfg = SamplerConfig { steps: 3, ..Default::default() };
    let traj = sampler::sample_grouped(family.as_ref(), &prompts, &cfg, &mut NoiseRng::new(4), 2).unwrap();
    let rows = |t: &candle_core::Tensor| (0..4).map(|i| t.get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect::<Vec<_>>();
    let (start, end) = (rows(&traj.latents[0]), rows(traj.final_sample()));
    assert_eq!(start[0], start[1]);
    assert_eq!(start[2], start[3]);
    assert_ne!(start[0], start[2]);
    assert_ne!(end[0], end[1], "the step noise differs within a group");
    // One sample per group's start: the ungrouped sampler's first draw is the first group's x_T.
    let plain = sampler::sample(family.as_ref(), &prompts[..1], &cfg, &mut NoiseRng::new(4)).unwrap();
    assert_eq!(rows(&plain.latents[0].repeat((4, 1, 1, 1)).unwrap())[0], start[0]);
}

#[test]
fn a_window_trains_only_its_steps_and_bad_groupings_are_refused() {
    let family = tiny_family(0);
    let config = TrainConfig { sampler: SamplerConfig { steps: 6, ..Default::default() }, min_train_sigma: 0.0, train_timesteps: Some((1, 4)), ..TrainConfig::default() };
    assert_eq!(config.trained_steps(family.as_ref()).unwrap(), vec![1, 2, 3]);
    let bad = |edit: fn(&mut TrainConfig)| {
        let mut c = small_config();
        edit(&mut c);
        c.validate().unwrap_err().to_string()
    };
    assert!(bad(|c| c.group_size = 3).contains("not a multiple of group_size 3"));
    assert!(bad(|c| c.same_noise = true).contains("same_noise needs a group_size above 1"));
    assert!(bad(|c| c.normalisation = Normalisation::Group { global_std: true }).contains("group_size must be above 1"));
    assert!(bad(|c| c.train_timesteps = Some((2, 9))).contains("train_timesteps 2..9 is not a window"));
}

/// The KL to a base with the policy's own weights is zero; it grows once the policy moves.
#[test]
fn the_kl_term_is_zero_at_the_reference() {
    let (policy, base) = (tiny_family(5), tiny_family(5));
    let prompts = prompt_pair();
    let cfg = SamplerConfig { steps: 3, ..Default::default() };
    let traj = sampler::sample(policy.as_ref(), &prompts, &cfg, &mut NoiseRng::new(1)).unwrap();
    let ts = vec![traj.timesteps[0]; 2];
    let step = |f: &dyn Family| f.log_prob(&prompts, &traj.latents[0], &traj.latents[1], &ts, &cfg).unwrap();
    let kl = ddpo::ddpo::kl_to_base(&step(policy.as_ref()), &step(base.as_ref())).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(kl, 0.0);
    let (_, var) = &policy.trainable_vars()[0];
    var.set(&(var.as_tensor() + 0.05).unwrap()).unwrap();
    let moved = ddpo::ddpo::kl_to_base(&step(policy.as_ref()), &step(base.as_ref())).unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 0.0, "{moved}");
}

/// PPO's clip fraction splits into ratios above 1 + eps and below 1 - eps.
#[test]
fn clip_fractions_split_high_and_low() {
    use candle_core::{Device, Tensor};
    let old = Tensor::new(&[0.0f32, 0.0, 0.0, 0.0, 0.0], &Device::Cpu).unwrap();
    // Ratios e^0.5 = 1.65 (high), e^-0.5 = 0.61 (low), 1.0, e^0.05 = 1.05, e^-0.3 = 0.74 (low).
    let new = Tensor::new(&[0.5f32, -0.5, 0.0, 0.05, -0.3], &Device::Cpu).unwrap();
    let adv = Tensor::new(&[1.0f32; 5], &Device::Cpu).unwrap();
    let l = ddpo::ddpo::loss::ppo_clip_loss(&new, &old, &adv, 0.2).unwrap();
    assert!((l.clipfrac_high - 0.2).abs() < 1e-6 && (l.clipfrac_low - 0.4).abs() < 1e-6, "{} {}", l.clipfrac_high, l.clipfrac_low);
    assert!((l.clipfrac - 0.6).abs() < 1e-6);
    let ratios = l.ratio.to_vec1::<f32>().unwrap();
    assert!((ratios[0] - 0.5f32.exp()).abs() < 1e-6 && ratios[2] == 1.0);
}

/// CFG-free training: sampling stays guided, the trained log-probs are the unguided model's and
/// are relabelled before the update, so the first ratio is exactly 1; the mean ratio per step is
/// reported for the trained steps only.
#[test]
fn cfg_free_training_starts_on_policy_and_reports_ratios_per_step() {
    let run = |train_guidance: Option<f64>| {
        let config = TrainConfig { train_guidance, timestep_fraction: 1.0, min_train_sigma: 0.0, train_timesteps: Some((0, 2)), ..small_config() };
        let mut t = Trainer::new(config, tiny_family(2), Arc::new(ByPrompt), prompt_source()).unwrap();
        t.run_epoch().unwrap()
    };
    let unguided = run(Some(1.0));
    assert!(unguided.first_ratio_max_dev < 1e-4, "relabelled log-probs: ratio 1 before any update, got {}", unguided.first_ratio_max_dev);
    assert_eq!(unguided.ratio_by_step.len(), 3);
    assert!(unguided.ratio_by_step[..2].iter().all(|r| r.is_finite() && (r - 1.0).abs() < 0.5), "{:?}", unguided.ratio_by_step);
    assert!(unguided.ratio_by_step[2].is_nan(), "step 2 is outside the window: {:?}", unguided.ratio_by_step);
    // The same epoch with guided training differs only in the update: sampling is identical.
    let guided = run(None);
    assert_eq!(guided.prompts, unguided.prompts);
    assert_eq!(guided.rewards(), unguided.rewards());
    let bad = TrainConfig { train_guidance: Some(-1.0), ..small_config() }.validate().unwrap_err().to_string();
    assert!(bad.contains("train_guidance must be a finite number >= 0"), "{bad}");
}
