//! DDIM step and trajectory sampling on small configs: closed-form log-densities, positive
//! variances, exact recompute, and gradients reaching every trainable tensor; the same sampler
//! over the test-double Gaussian family.

use crate::common;

use candle_core::{Device, Tensor};
use common::fixtures::{prompt_pair as prompts, tiny_family};
use common::gaussian::{GaussianFamily, DECAY};
use ddpo::ddpo::TrainConfig;
use ddpo::family::ddpm::{ddim_sigma, ddim_step, NoiseSchedule, ScheduleConfig};
use ddpo::family::{Family, NoiseRng, PixelPolicy, Policy, PolicyConfig, SamplerConfig};
use ddpo::sampler;

fn pixel_schedule() -> NoiseSchedule {
    NoiseSchedule::new(ScheduleConfig::pixel_default()).unwrap()
}

#[test]
fn linear_schedule_alphas_follow_ddpm_definition() {
    let s = pixel_schedule();
    let mut prod = 1.0f64;
    for t in 0..1000 {
        let beta = 1e-4 + (0.02 - 1e-4) * t as f64 / 999.0;
        prod *= 1.0 - beta;
        assert!((s.alpha_bar(t) - prod).abs() < 1e-12, "t={t}");
    }
    assert_eq!(s.ddim_timesteps(4), vec![751, 501, 251, 1]);
    assert_eq!(s.prev_timestep(0, 4), 0);
}

/// log p(prev | x, eps) of one DDIM step computed by hand, in f64; x0 clamped to +-1 when `clip`.
fn hand_computed_log_prob(s: &NoiseSchedule, t: usize, t_prev: usize, eta: f64, x: &[f32], eps: &[f32], prev: &[f32], clip: bool) -> f64 {
    let ab_t = s.alpha_bar(t);
    let ab_p = s.alpha_bar(t_prev);
    let sigma = eta * ((1.0 - ab_p) / (1.0 - ab_t) * (1.0 - ab_t / ab_p)).sqrt();
    let mut sum = 0.0;
    for i in 0..x.len() {
        let x0 = (x[i] as f64 - (1.0 - ab_t).sqrt() * eps[i] as f64) / ab_t.sqrt();
        let x0 = if clip { x0.clamp(-1.0, 1.0) } else { x0 };
        let mean = ab_p.sqrt() * x0 + (1.0 - ab_p - sigma * sigma).sqrt() * eps[i] as f64;
        let d = prev[i] as f64 - mean;
        sum += -d * d / (2.0 * sigma * sigma) - sigma.ln() - (2.0 * std::f64::consts::PI).sqrt().ln();
    }
    sum / x.len() as f64
}

#[test]
fn ddim_log_prob_equals_hand_computed_gaussian() {
    let (t, steps, eta) = (500usize, 10usize, 0.7);
    // The last element's predicted x0 is ~2.9, so clip_sample changes its mean.
    let x = [0.3f32, -0.2, 0.5, 1.0];
    let eps = [0.1f32, 0.4, -0.3, 0.2];
    let prev = [0.25f32, -0.1, 0.4, 0.9];
    let dev = Device::Cpu;
    let tensor = |v: &[f32]| Tensor::from_slice(v, (1, 1, 2, 2), &dev).unwrap();
    let mut results = Vec::new();
    for clip in [false, true] {
        let s = NoiseSchedule::new(ScheduleConfig { clip_sample: clip, ..ScheduleConfig::pixel_default() }).unwrap();
        let out = ddim_step(&s, &tensor(&eps), &[t], &tensor(&x), steps, eta, Some(&tensor(&prev)), None).unwrap();
        let want = hand_computed_log_prob(&s, t, t - 100, eta, &x, &eps, &prev, clip);
        let got = out.log_prob.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "clip {clip}: got {got}, want {want}");
        results.push(got);
    }
    assert!((results[0] - results[1]).abs() > 1e-2, "clip_sample must change the step: {results:?}");
}

#[test]
fn every_step_has_positive_sigma() {
    let s = pixel_schedule();
    for steps in [1, 4, 20, 50] {
        for t in s.ddim_timesteps(steps) {
            let sigma = ddim_sigma(&s, t, s.prev_timestep(t, steps), 1.0);
            assert!(sigma > 0.0 && sigma.is_finite(), "steps {steps}, t {t}: sigma {sigma}");
        }
    }
}

fn tiny_policy() -> PixelPolicy {
    *tiny_family(0)
}

#[test]
fn near_deterministic_steps_are_left_out_of_the_policy_gradient() {
    let policy = PixelPolicy(Policy::new_random(PolicyConfig::shapes_default(), 0, &Device::Cpu).unwrap());
    let config = TrainConfig::default();
    assert_eq!(config.sampler.steps, 10);
    // sigma of the 10 steps: 0.91 .. 0.29 for the first eight, then 0.0148 (t = 101 -> 1)
    // and 0.0074 (t = 1 -> 0).
    assert_eq!(config.trained_steps(&policy).unwrap(), (0..8).collect::<Vec<_>>());
    let all = TrainConfig { min_train_sigma: 0.0, ..TrainConfig::default() };
    assert_eq!(all.trained_steps(&policy).unwrap().len(), 10);
    let none = TrainConfig { min_train_sigma: 2.0, ..TrainConfig::default() };
    let err = none.trained_steps(&policy).unwrap_err().to_string();
    assert!(err.contains("min_train_sigma") && err.contains("leaves none of the 10 sampling steps"), "{err}");
}

#[test]
fn gaussian_family_log_prob_is_its_closed_form() {
    let family = GaussianFamily::new(0.25);
    let cfg = SamplerConfig { steps: 4, ..Default::default() };
    let traj = sampler::sample(&family, &prompts(), &cfg, &mut NoiseRng::new(2)).unwrap();
    assert_eq!(traj.timesteps, vec![100, 75, 50, 25]);
    for k in 0..4 {
        let (x, prev) = (traj.latents[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(), traj.latents[k + 1].flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let sigma = GaussianFamily::sigma(traj.timesteps[k]);
        let per_sample = x.len() / 2;
        for i in 0..2 {
            let range = i * per_sample..(i + 1) * per_sample;
            let want: f64 = range
                .map(|j| {
                    let d = prev[j] as f64 - (DECAY * x[j] as f64 + 0.25);
                    -d * d / (2.0 * sigma * sigma) - sigma.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
                })
                .sum::<f64>()
                / per_sample as f64;
            let got = traj.log_probs.get(i).unwrap().get(k).unwrap().to_scalar::<f32>().unwrap() as f64;
            assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "step {k} sample {i}: {got} vs {want}");
        }
    }
    assert_eq!(family.images(traj.final_sample()).unwrap()[0].dimensions(), (4, 4));
}

#[test]
fn recomputed_log_prob_equals_sampled_one() {
    let policy = tiny_policy();
    let cfg = SamplerConfig { steps: 4, ..Default::default() };
    let traj = sampler::sample(&policy, &prompts(), &cfg, &mut NoiseRng::new(7)).unwrap();
    assert_eq!(traj.latents.len(), 5);
    assert_eq!(traj.log_probs.dims(), &[2, 4]);
    let sampled: Vec<Vec<f32>> = traj.log_probs.to_vec2().unwrap();
    for k in 0..4 {
        let ts = vec![traj.timesteps[k]; 2];
        let lp = sampler::transition(&policy, &prompts(), &traj.latents[k], &traj.latents[k + 1], &ts, &cfg).unwrap().log_prob;
        for (i, v) in lp.to_vec1::<f32>().unwrap().into_iter().enumerate() {
            assert!(v.is_finite());
            assert!((v - sampled[i][k]).abs() < 1e-4, "step {k} sample {i}: {v} vs {}", sampled[i][k]);
        }
    }
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let policy = tiny_policy();
    let cfg = SamplerConfig { steps: 2, ..Default::default() };
    let a = sampler::sample(&policy, &prompts(), &cfg, &mut NoiseRng::new(3)).unwrap();
    let b = sampler::sample(&policy, &prompts(), &cfg, &mut NoiseRng::new(3)).unwrap();
    let c = sampler::sample(&policy, &prompts(), &cfg, &mut NoiseRng::new(4)).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(flat(a.final_sample()), flat(b.final_sample()));
    assert_ne!(flat(a.final_sample()), flat(c.final_sample()));
}

#[test]
fn ddpo_loss_reaches_every_trainable_tensor() {
    let policy = tiny_policy();
    let cfg = SamplerConfig { steps: 2, ..Default::default() };
    let traj = sampler::sample(&policy, &prompts(), &cfg, &mut NoiseRng::new(11)).unwrap();
    let ts = vec![traj.timesteps[0]; 2];
    let lp = sampler::transition(&policy, &prompts(), &traj.latents[0], &traj.latents[1], &ts, &cfg).unwrap().log_prob;
    let adv = Tensor::new(&[1.0f32, -0.5], &Device::Cpu).unwrap();
    let loss = (lp * adv).unwrap().mean_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    let vars = policy.trainable_vars();
    assert!(vars.len() > 50);
    for (name, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} received no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
    }
}

#[test]
fn noise_rng_resumes_exactly() {
    let mut a = NoiseRng::new(5);
    a.randn(10, &Device::Cpu).unwrap();
    let mut b = NoiseRng::restore(a.state());
    let x: Vec<f32> = a.randn(8, &Device::Cpu).unwrap().to_vec1().unwrap();
    let y: Vec<f32> = b.randn(8, &Device::Cpu).unwrap().to_vec1().unwrap();
    assert_eq!(x, y);
}
