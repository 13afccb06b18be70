//! The shipped model's own reference outputs (`shapes-golden/golden.safetensors`, written on CPU
//! in f32 by [`write_golden`]): a guided noise prediction for fixed input and a seeded 4-step
//! trajectory, whose every transition's log-prob is recomputed from the stored samples. The
//! shapes model always runs in f32 (it has no half-precision weights), whatever `--dtype` says.

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};

use super::{check, failed, max_abs_diff, CheckResult, Golden, SelftestOptions, Tolerances};
use crate::family::{Family, NoiseRng, PixelPolicy, SamplerConfig, WeightDtype};

const PROMPTS: [&str; 2] = ["a red circle", "two blue squares"];
const SAMPLER: SamplerConfig = SamplerConfig::new(4, 1.0, 5.0);
const SEED: u64 = 19;
/// The noise prediction's timesteps, one per prompt.
const EPS_TIMESTEPS: [usize; 2] = [500, 250];
const NAMES: [&str; 2] = ["shapes.guided_eps", "shapes.trajectory_log_probs"];

/// The golden file inside the fixtures folder.
pub fn golden_path(fixtures: &Path) -> std::path::PathBuf {
    fixtures.join("shapes-golden/golden.safetensors")
}

fn prompts() -> Vec<String> {
    PROMPTS.iter().map(|p| p.to_string()).collect()
}

/// The shipped model's checks, on `options.device` in f32.
pub fn checks(options: &SelftestOptions) -> Vec<CheckResult> {
    let tol = Tolerances::for_dtype(WeightDtype::F32);
    let loaded = Golden::load(&golden_path(&options.fixtures), &options.device).and_then(|g| {
        let model = &options.shapes_model;
        let policy = PixelPolicy::open_frozen(model, None, WeightDtype::F32, &options.device)
            .with_context(|| format!("loading the shipped model {} (pass --shapes-model PATH)", model.display()))?;
        Ok((g, policy))
    });
    let (g, policy) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return failed(&NAMES, tol.activation, &e),
    };
    vec![
        check(NAMES[0], tol.activation, || max_abs_diff(&guided_eps(&policy, g.get("eps.x")?)?, g.get("eps.guided")?)),
        check(NAMES[1], tol.log_prob, || trajectory_log_probs(&policy, &g)),
    ]
}

fn guided_eps(policy: &PixelPolicy, x: &Tensor) -> anyhow::Result<Tensor> {
    let core = &policy.0;
    let cond = core.encode_prompts(&PROMPTS)?;
    let uncond = core.encode_prompts(&["", ""])?;
    Ok(core.guided_eps(x, &EPS_TIMESTEPS, &cond, &uncond, SAMPLER.guidance)?)
}

/// The stored trajectory's transitions recomputed under the model: its samples are data, so a
/// device's rounding differences do not compound along the trajectory.
fn trajectory_log_probs(policy: &PixelPolicy, g: &Golden) -> anyhow::Result<f32> {
    let samples = g.get("traj.samples")?;
    let mut ours = Vec::new();
    for (i, t) in policy.timesteps(SAMPLER.steps).into_iter().enumerate() {
        let (x, x_prev) = (samples.get(i)?, samples.get(i + 1)?);
        let ts = vec![t; PROMPTS.len()];
        ours.push(crate::sampler::transition(policy, &prompts(), &x, &x_prev, &ts, &SAMPLER)?.log_prob);
    }
    max_abs_diff(&Tensor::stack(&ours, 1)?, g.get("traj.log_probs")?)
}

/// Computes the reference outputs of `model` on CPU in f32 and writes them to the golden file
/// under `fixtures` (run after the shipped model changes, then commit the file).
pub fn write_golden(model: &Path, fixtures: &Path) -> anyhow::Result<std::path::PathBuf> {
    let device = Device::Cpu;
    let policy = PixelPolicy::open_frozen(model, None, WeightDtype::F32, &device)?;
    let mut rng = NoiseRng::new(SEED);
    let x = rng.randn(policy.sample_shape(PROMPTS.len()), &device)?;
    let eps = guided_eps(&policy, &x)?;
    let traj = crate::sampler::sample(&policy, &prompts(), &SAMPLER, &mut rng)?;
    let tensors = [
        ("eps.x".to_string(), x),
        ("eps.guided".to_string(), eps),
        ("traj.samples".to_string(), Tensor::stack(&traj.latents, 0)?),
        ("traj.log_probs".to_string(), traj.log_probs),
    ];
    let path = golden_path(fixtures);
    std::fs::create_dir_all(path.parent().context("a golden path has a folder")?)
        .with_context(|| format!("cannot create the folder of {}", path.display()))?;
    candle_core::safetensors::save(&tensors.into_iter().collect(), &path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
