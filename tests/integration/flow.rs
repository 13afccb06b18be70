//! The flow-matching family: the shifted sigma schedule, Flow-GRPO's SDE step against its
//! formula, a trajectory's log-probs recomputed exactly (ratio 1), the flow-matching loss
//! learning, and a DDPO epoch, group-relative with a LoRA KL term, through the unchanged trainer.

use crate::common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::fixtures::prompt_source;
use ddpo::ddpo::{Normalisation, TrainConfig, Trainer};
use ddpo::family::flow::{cps_std, cps_step, sde_step, sigmas, step_std, FlowPolicy};
use ddpo::family::{Family, FlowStep, NoiseRng, Policy, PolicyConfig, SamplerConfig};
use ddpo::sampler;

fn tiny_flow(seed: u64) -> FlowPolicy {
    let config = PolicyConfig { flow_shift: Some(3.0), ..PolicyConfig::tiny_test() };
    FlowPolicy::new(Policy::new_random(config, seed, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn sigmas_are_shifted_from_one_to_zero() {
    let s = sigmas(4, 1.0);
    assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    let shifted = sigmas(2, 3.0);
    // u = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert_eq!(shifted, vec![1.0, 0.75, 0.0]);
}

/// Mean, standard deviation and log-density of one step, element by element in f64.
#[test]
fn the_sde_step_matches_flow_grpo_formula() {
    let dev = Device::Cpu;
    let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    let v: Vec<f32> = (0..12).map(|i| (i as f32 * 0.91).cos()).collect();
    let prev: Vec<f32> = (0..12).map(|i| (i as f32 * 0.53).sin() * 0.8).collect();
    let t = |d: &[f32]| Tensor::from_vec(d.to_vec(), (2, 1, 2, 3), &dev).unwrap();
    let sig = sigmas(10, 3.0);
    let a = 0.7;
    for k in [0, 4, 9] {
        let out = sde_step(&t(&x), &t(&v), &sig, k, a, Some(&t(&prev)), None).unwrap();
        let (s, s1) = (sig[k], sig[k + 1]);
        let dt = s1 - s;
        let denom = if k == 0 { 1.0 - sig[1] } else { 1.0 - s };
        let sd = a * (s / denom).sqrt();
        let std = sd * (-dt).sqrt();
        assert!((step_std(&sig, k, a) - std).abs() < 1e-12);
        let mean = out.mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lp = out.log_prob.to_vec1::<f32>().unwrap();
        for b in 0..2 {
            let mut want_lp = 0.0;
            for i in 0..6 {
                let j = b * 6 + i;
                let m = x[j] as f64 * (1.0 + sd * sd * dt / (2.0 * s)) + v[j] as f64 * (1.0 + sd * sd * (1.0 - s) / (2.0 * s)) * dt;
                assert!((mean[j] as f64 - m).abs() < 1e-5, "step {k} mean {j}: {} vs {m}", mean[j]);
                want_lp += -(prev[j] as f64 - m).powi(2) / (2.0 * std * std) - std.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln();
            }
            want_lp /= 6.0;
            assert!((lp[b] as f64 - want_lp).abs() < 1e-3 * want_lp.abs().max(1.0), "step {k} log-prob {} vs {want_lp}", lp[b]);
        }
    }
}

/// Flow-GRPO's CPS step element by element: std = s' sin(a pi / 2), mean (1 - s') x0 +
/// sqrt(s'^2 - std^2) x1; noise level 0 is the Euler step x + (s' - s) v; the last step is
/// deterministic. With x0 and x1 the true image and noise, x' keeps the path's coefficients.
#[test]
fn the_cps_step_matches_flow_grpo_formula() {
    let dev = Device::Cpu;
    let x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
    let v: Vec<f32> = (0..12).map(|i| (i as f32 * 0.91).cos()).collect();
    let prev: Vec<f32> = (0..12).map(|i| (i as f32 * 0.53).sin() * 0.8).collect();
    let t = |d: &[f32]| Tensor::from_vec(d.to_vec(), (2, 1, 2, 3), &dev).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let sig = sigmas(10, 3.0);
    let a = 0.8;
    for k in [0, 4, 8] {
        let out = cps_step(&t(&x), &t(&v), &sig, k, a, Some(&t(&prev)), None).unwrap();
        let (s, s1) = (sig[k], sig[k + 1]);
        let std = s1 * (a * std::f64::consts::PI / 2.0).sin();
        assert!((cps_std(&sig, k, a) - std).abs() < 1e-12);
        let (mean, lp) = (flat(&out.mean), out.log_prob.to_vec1::<f32>().unwrap());
        for b in 0..2 {
            let mut want_lp = 0.0;
            for i in 0..6 {
                let j = b * 6 + i;
                let (x0, x1) = (x[j] as f64 - s * v[j] as f64, x[j] as f64 + (1.0 - s) * v[j] as f64);
                let m = (1.0 - s1) * x0 + (s1 * s1 - std * std).sqrt() * x1;
                assert!((mean[j] as f64 - m).abs() < 1e-5, "step {k} mean {j}: {} vs {m}", mean[j]);
                want_lp += -(prev[j] as f64 - m).powi(2) / (2.0 * std * std) - std.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln();
            }
            want_lp /= 6.0;
            assert!((lp[b] as f64 - want_lp).abs() < 1e-3 * want_lp.abs().max(1.0), "step {k} log-prob {} vs {want_lp}", lp[b]);
        }
        // Noise level 0: the Euler ODE step.
        let ode = flat(&cps_step(&t(&x), &t(&v), &sig, k, 0.0, None, Some(&t(&prev))).unwrap().prev_sample);
        for j in 0..12 {
            let euler = x[j] as f64 + (s1 - s) * v[j] as f64;
            assert!((ode[j] as f64 - euler).abs() < 1e-5, "step {k} ODE {j}: {} vs {euler}", ode[j]);
        }
    }
    // From a point of the path, x = (1 - s) x0 + s x1, with its exact velocity x1 - x0, the step
    // lands on the path at s': x' - (1 - s') x0 has the variance s'^2 of fresh noise.
    let k = 3;
    let (s, s1) = (sig[k], sig[k + 1]);
    let n = 40_000;
    let mut rng = NoiseRng::new(11);
    let x0 = Tensor::full(0.3f32, (1, n), &dev).unwrap();
    let x1 = rng.randn((1, n), &dev).unwrap();
    let on_path = ((&x0 * (1.0 - s)).unwrap() + (&x1 * s).unwrap()).unwrap();
    let z = rng.randn((1, n), &dev).unwrap();
    let next = cps_step(&on_path, &(&x1 - &x0).unwrap(), &sig, k, a, None, Some(&z)).unwrap().prev_sample;
    let rest = flat(&(next - (&x0 * (1.0 - s1)).unwrap()).unwrap());
    let var = rest.iter().map(|r| (*r as f64).powi(2)).sum::<f64>() / n as f64;
    assert!((var / (s1 * s1) - 1.0).abs() < 0.03, "variance {var} vs s'^2 {}", s1 * s1);
    // The final step (s' = 0) is deterministic: the clean estimate, log-prob 0, std 0.
    let last = cps_step(&t(&x), &t(&v), &sig, 9, a, Some(&t(&prev)), None).unwrap();
    assert_eq!(flat(&last.sigma), vec![0.0, 0.0]);
    assert_eq!(last.log_prob.to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
    let x0: Vec<f32> = (0..12).map(|j| x[j] - sig[9] as f32 * v[j]).collect();
    assert!(flat(&last.mean).iter().zip(&x0).all(|(m, w)| (m - w).abs() < 1e-6));
}

#[test]
fn a_cps_trajectory_recomputes_to_its_own_log_probs_and_trains_without_its_last_step() {
    let policy = tiny_flow(1);
    let prompts = vec!["a red circle on a blue background".to_string(), "two green squares on a black background".to_string()];
    let cfg = SamplerConfig { flow_step: FlowStep::Cps, ..SamplerConfig::new(4, 0.8, 2.0) };
    policy.check_sampler(&cfg).unwrap();
    let traj = sampler::sample(&policy, &prompts, &cfg, &mut NoiseRng::new(3)).unwrap();
    for (k, &t) in traj.timesteps.iter().enumerate() {
        let step = policy.log_prob(&prompts, &traj.latents[k], &traj.latents[k + 1], &[t, t], &cfg).unwrap();
        let (new, old) = (step.log_prob.to_vec1::<f32>().unwrap(), traj.log_probs.narrow(1, k, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for (a, b) in new.iter().zip(&old) {
            assert!(a.is_finite() && (a - b).abs() < 1e-4, "step {k}: recomputed {a} vs sampled {b}");
        }
    }
    let train = TrainConfig { sampler: cfg, min_train_sigma: 0.0, ..Default::default() };
    assert_eq!(train.trained_steps(&policy).unwrap(), vec![0, 1, 2], "the deterministic last step is not trained");
    let bad = policy.check_sampler(&SamplerConfig { eta: 1.5, ..cfg }).unwrap_err().to_string();
    assert!(bad.contains("at most 1"), "{bad}");
    // The DDPM families have one kind of step and say so.
    let ddpm = ddpo::family::PixelPolicy(Policy::new_random(PolicyConfig::tiny_test(), 1, &Device::Cpu).unwrap());
    let err = ddpm.check_sampler(&cfg).unwrap_err().to_string();
    assert!(err.contains("flow_step") && err.contains("steps with DDIM"), "{err}");
}

#[test]
fn a_trajectory_recomputes_to_its_own_log_probs() {
    let policy = tiny_flow(1);
    let prompts = vec!["a red circle on a blue background".to_string(), "two green squares on a black background".to_string()];
    let cfg = SamplerConfig::new(4, 0.7, 2.0);
    policy.check_sampler(&cfg).unwrap();
    let traj = sampler::sample(&policy, &prompts, &cfg, &mut NoiseRng::new(3)).unwrap();
    assert_eq!(traj.timesteps, vec![1000, 900, 750, 500], "labels: round(1000 s) of the shifted schedule");
    for (k, &t) in traj.timesteps.iter().enumerate() {
        let step = policy.log_prob(&prompts, &traj.latents[k], &traj.latents[k + 1], &[t, t], &cfg).unwrap();
        let (new, old) = (step.log_prob.to_vec1::<f32>().unwrap(), traj.log_probs.narrow(1, k, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for (a, b) in new.iter().zip(&old) {
            assert!((a - b).abs() < 1e-4, "step {k}: recomputed {a} vs sampled {b}");
        }
    }
    let bad = policy.check_sampler(&SamplerConfig { eta: -0.1, ..cfg }).unwrap_err().to_string();
    assert!(bad.contains("noise level"), "{bad}");
}

/// Noise level 0 is the Euler ODE x' = x + (s' - s) v: deterministic whatever the noise, with
/// log-prob 0. Evaluations default to it on a flow model; training refuses it.
#[test]
fn noise_level_zero_integrates_the_ode() {
    let dev = Device::Cpu;
    let x = Tensor::from_vec((0..12).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), (2, 1, 2, 3), &dev).unwrap();
    let v = Tensor::from_vec((0..12).map(|i| (i as f32 * 0.91).cos()).collect::<Vec<_>>(), (2, 1, 2, 3), &dev).unwrap();
    let sig = sigmas(5, 3.0);
    for k in [0, 2, 4] {
        let euler = (&x + (&v * (sig[k + 1] - sig[k])).unwrap()).unwrap();
        for seed in [1, 2] {
            let noise = NoiseRng::new(seed).randn(x.shape(), &dev).unwrap();
            let out = sde_step(&x, &v, &sig, k, 0.0, None, Some(&noise)).unwrap();
            let off = (&out.prev_sample - &euler).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(off < 1e-6, "step {k}: off the Euler step by {off}");
            assert_eq!(out.log_prob.to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
        }
    }

    let policy = tiny_flow(6);
    let ode = policy.eval_sampler();
    assert_eq!(ode.eta, 0.0, "flow models evaluate with the ODE");
    policy.check_sampler(&ode).unwrap();
    let prompts = vec!["a red circle on a blue background".to_string()];
    let traj = sampler::sample(&policy, &prompts, &SamplerConfig { steps: 3, ..ode }, &mut NoiseRng::new(1)).unwrap();
    for (k, &t) in traj.timesteps.iter().enumerate() {
        let step = policy.log_prob(&prompts, &traj.latents[k], &traj.latents[k + 1], &[t], &SamplerConfig { steps: 3, ..ode }).unwrap();
        let off = (&step.mean - &traj.latents[k + 1]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(off < 1e-5, "step {k}: the sample is the step's mean, off by {off}");
    }
    let refused = TrainConfig { sampler: ode, ..Default::default() }.validate().unwrap_err().to_string();
    assert!(refused.contains("must be > 0 to train"), "{refused}");
}

/// Flow-GRPO-Fast's SDE window: steps 1..3 of 5 are stochastic, the others ODE steps with
/// log-prob 0; the trainer trains exactly the window, and the trajectory recomputes on policy.
/// DDIM families refuse the window (their eta-0 step has no log-prob).
#[test]
fn an_sde_window_samples_the_ode_elsewhere_and_trains_only_the_window() {
    let policy = tiny_flow(7);
    let cfg = SamplerConfig { sde_window: Some((1, 3)), ..SamplerConfig::new(5, 0.7, 2.0) };
    policy.check_sampler(&cfg).unwrap();
    let prompts = vec!["a red circle on a blue background".to_string(), "two green squares on a black background".to_string()];
    let traj = sampler::sample(&policy, &prompts, &cfg, &mut NoiseRng::new(5)).unwrap();
    let lp = traj.log_probs.to_vec2::<f32>().unwrap();
    for row in &lp {
        for (k, &l) in row.iter().enumerate() {
            assert_eq!(l == 0.0, !(1..3).contains(&k), "step {k}: log-prob {l}");
        }
    }
    for (k, &t) in traj.timesteps.iter().enumerate() {
        let step = policy.log_prob(&prompts, &traj.latents[k], &traj.latents[k + 1], &[t, t], &cfg).unwrap();
        let new = step.log_prob.to_vec1::<f32>().unwrap();
        for (b, row) in lp.iter().enumerate() {
            assert!((new[b] - row[k]).abs() < 1e-4, "step {k}: recomputed {} vs sampled {}", new[b], row[k]);
        }
    }
    let train = TrainConfig { sampler: cfg, min_train_sigma: 0.0, ..Default::default() };
    assert_eq!(train.trained_steps(&policy).unwrap(), vec![1, 2]);
    let bad = policy.check_sampler(&SamplerConfig { sde_window: Some((3, 6)), ..cfg }).unwrap_err().to_string();
    assert!(bad.contains("not a window of the 5 sampling steps"), "{bad}");
    let ddim = common::fixtures::tiny_family(0);
    let refused = ddim.check_sampler(&SamplerConfig { sde_window: Some((1, 3)), ..SamplerConfig::new(5, 1.0, 2.0) }).unwrap_err().to_string();
    assert!(refused.contains("for flow models"), "{refused}");
}

/// A few AdamW steps of the flow-matching loss on one batch of shapes-world images lower it.
#[test]
fn the_flow_matching_loss_learns() {
    use ddpo::optim::{accumulate, AdamW, AdamWConfig, Grads};
    let policy = tiny_flow(2);
    let samples = ddpo::world::ShapesWorld::default().batch(0, 4);
    let images: Vec<image::RgbImage> = samples.iter().map(|s| image::imageops::resize(&s.image, 16, 16, image::imageops::FilterType::Triangle)).collect();
    let x0 = ddpo::render::images_to_tensor(&images, &Device::Cpu).unwrap();
    let prompts: Vec<String> = samples.iter().map(|s| s.caption.clone()).collect();
    let mut opt = AdamW::new(policy.trainable_vars(), AdamWConfig { lr: 3e-3, warmup_steps: 0, ..Default::default() }).unwrap();
    let loss_at = |rng_seed: u64| policy.denoising_loss(&x0, &prompts, &mut NoiseRng::new(rng_seed)).unwrap().mean_all().unwrap();
    let before = loss_at(99).to_scalar::<f32>().unwrap();
    for step in 0..30 {
        let loss = loss_at(step);
        let mut grads: Grads = Vec::new();
        accumulate(&mut grads, &opt.collect(&loss.backward().unwrap()), 1.0).unwrap();
        opt.step(&mut grads).unwrap();
    }
    let after = loss_at(99).to_scalar::<f32>().unwrap();
    assert!(after < 0.8 * before, "flow-matching loss {before} -> {after}");
}

/// The trainer, which knows nothing of flows, runs group-relative epochs on the flow family
/// with a LoRA adapter and its KL term to the adapters-off reference.
#[test]
fn the_unchanged_trainer_trains_a_flow_policy() {
    let base = tiny_flow(4);
    let weights: std::collections::HashMap<String, Tensor> = base.0.trainable_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &Device::Cpu);
    let config = PolicyConfig { flow_shift: Some(3.0), ..PolicyConfig::tiny_test() };
    let lora = FlowPolicy::new(Policy::with_lora(config, vb, ddpo::model::LoraConfig { rank: 2, alpha: 4.0 }, 5, &Device::Cpu).unwrap()).unwrap();
    let train = TrainConfig {
        samples_per_epoch: 8,
        sample_batch_size: 4,
        train_batch_size: 4,
        group_size: 4,
        same_noise: true,
        normalisation: Normalisation::Group { global_std: false },
        kl_weight: 0.1,
        sampler: SamplerConfig::new(4, 0.7, 1.0),
        min_train_sigma: 0.0,
        optimizer: ddpo::optim::AdamWConfig { lr: 1e-2, warmup_steps: 0, ..Default::default() },
        ..Default::default()
    };
    let reward: Arc<dyn ddpo::reward::Reward> = Arc::new(ddpo::reward::Brightness);
    let mut trainer = Trainer::new(train, Box::new(lora), reward, prompt_source()).unwrap();
    for _ in 0..2 {
        let r = trainer.run_epoch().unwrap();
        assert!(r.first_ratio_max_dev < 1e-3, "on-policy: ratio 1 before the update, got {}", r.first_ratio_max_dev);
        assert!(r.loss.is_finite() && r.kl_base.is_finite() && r.out_of_range.is_finite());
        assert_eq!(r.ratio_by_step.len(), 4);
    }
}
