//! The tiny Stable Diffusion fixture's checks (`tests/fixtures/tiny-sd`, whose `golden.safetensors`
//! was written by diffusers, transformers and ddpo-pytorch): text encoder states, UNet noise
//! predictions, VAE decode, the DDIM step's log-probs, and a whole reference trajectory's
//! log-probs and images through the policy seam (`LatentPolicy` + `sampler::transition`).

use anyhow::Context;
use candle_core::{IndexOp, Tensor};

use super::{check, failed, max_abs_diff, CheckResult, Golden, SelftestOptions, Tolerances};
use crate::family::ddpm::ddim_step;
use crate::family::sd::{post_process, Finetune, LatentPolicy};
use crate::family::{Family, SamplerConfig};

/// The prompts the reference encoded, in its order.
pub const PROMPTS: [&str; 2] = ["a photo of a cat", "an astronaut riding a horse on the moon"];
/// The reference trajectory's sampler: 20 DDIM steps, eta 1, guidance 5.
pub const TRAJECTORY: SamplerConfig = SamplerConfig::new(20, 1.0, 5.0);

const NAMES: [&str; 6] = [
    "tiny-sd.text_encoder",
    "tiny-sd.unet",
    "tiny-sd.vae",
    "tiny-sd.ddim_step",
    "tiny-sd.trajectory_log_probs",
    "tiny-sd.trajectory_images",
];

/// The fixture's checks, on `options.device` with frozen weights in `options.dtype`.
pub fn checks(options: &SelftestOptions) -> Vec<CheckResult> {
    let tol = Tolerances::for_dtype(options.dtype);
    let dir = options.fixtures.join("tiny-sd");
    let loaded = Golden::load(&dir.join("golden.safetensors"), &options.device).and_then(|g| {
        let policy = LatentPolicy::load(&dir, Finetune::Frozen, options.dtype.dtype(), &options.device)
            .with_context(|| format!("loading the tiny-sd fixture in {} on {:?}", dir.display(), options.device))?;
        Ok((g, policy))
    });
    let (g, policy) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return failed(&NAMES, tol.activation, &e),
    };
    vec![
        check(NAMES[0], tol.activation, || text_encoder(&policy, &g)),
        check(NAMES[1], tol.activation, || unet(&policy, &g)),
        check(NAMES[2], tol.image, || max_abs_diff(&policy.vae.decode(g.get("vae.latents")?)?, g.get("vae.image")?)),
        // the DDIM step is sampler arithmetic, always f32 whatever the weights' dtype
        check(NAMES[3], 1e-4, || ddim_step_log_probs(&policy, &g)),
        check(NAMES[4], tol.log_prob, || trajectory_log_probs(&policy, &g)),
        check(NAMES[5], tol.image, || trajectory_images(&policy, &g)),
    ]
}

/// Our tokenizer and text encoder against transformers' hidden states, prompts and empty prompt.
fn text_encoder(policy: &LatentPolicy, g: &Golden) -> anyhow::Result<f32> {
    let cond = max_abs_diff(&policy.policy.encode_prompts(&PROMPTS)?, g.get("text.hidden_cond")?)?;
    let uncond = max_abs_diff(&policy.policy.encode_prompts(&["", ""])?, g.get("text.hidden_uncond")?)?;
    Ok(cond.max(uncond))
}

/// Unguided noise predictions for the reference's latents, conditional and unconditional.
fn unet(policy: &LatentPolicy, g: &Golden) -> anyhow::Result<f32> {
    let t = scalar_timestep(g.get("unet.timestep")?)?;
    let x = g.get("unet.latents")?;
    let mut err = 0f32;
    for (ctx, want) in [("text.hidden_uncond", "unet.eps_uncond"), ("text.hidden_cond", "unet.eps_cond")] {
        let eps = policy.policy.predict_eps(x, &vec![t; x.dim(0)?], g.get(ctx)?)?;
        err = err.max(max_abs_diff(&eps, g.get(want)?)?);
    }
    Ok(err)
}

/// `ddim_step_with_logprob`'s log-probs at a middle and the last step, from the reference's eps.
fn ddim_step_log_probs(policy: &LatentPolicy, g: &Golden) -> anyhow::Result<f32> {
    let schedule = &policy.policy.schedule;
    let timesteps = schedule.ddim_timesteps(TRAJECTORY.steps);
    let mut err = 0f32;
    for (name, idx) in [("step_mid", 10), ("step_last", 19)] {
        let t = timesteps[idx];
        let want_t = scalar_timestep(g.get(&format!("{name}.timestep"))?)?;
        anyhow::ensure!(want_t == t, "{name}: our schedule's step {idx} is t={t}, the reference's t={want_t}");
        let prev = g.get(&format!("{name}.prev_sample"))?;
        let out = ddim_step(schedule, g.get("unet.eps_guided_5")?, &[t, t], g.get("unet.latents")?, TRAJECTORY.steps, TRAJECTORY.eta, Some(prev), None)?;
        err = err.max(max_abs_diff(&out.log_prob, g.get(&format!("{name}.log_prob"))?)?);
    }
    Ok(err)
}

/// Every transition of the reference trajectory recomputed through the policy seam.
fn trajectory_log_probs(policy: &LatentPolicy, g: &Golden) -> anyhow::Result<f32> {
    let prompts: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    let latents = g.get("traj.latents")?;
    let mut ours = Vec::new();
    for (i, t) in policy.timesteps(TRAJECTORY.steps).into_iter().enumerate() {
        let (x, x_prev) = (latents.i((.., i))?, latents.i((.., i + 1))?);
        ours.push(crate::sampler::transition(policy, &prompts, &x, &x_prev, &[t, t], &TRAJECTORY)?.log_prob);
    }
    max_abs_diff(&Tensor::stack(&ours, 1)?, g.get("traj.log_probs")?)
}

/// The reference trajectory's final latents decoded through `Family::decode`.
fn trajectory_images(policy: &LatentPolicy, g: &Golden) -> anyhow::Result<f32> {
    let last = g.get("traj.latents")?.i((.., TRAJECTORY.steps))?;
    max_abs_diff(&post_process(&Family::decode(policy, &last)?)?, g.get("traj.images")?)
}

fn scalar_timestep(t: &Tensor) -> anyhow::Result<usize> {
    let t: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let first = *t.first().context("an empty timestep tensor")?;
    Ok(first as usize)
}
