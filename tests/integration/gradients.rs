//! The whole policy's gradient against finite differences: the denoising loss of the v1 and v2
//! architectures (our conv, linear, attention and norm kernels together), differentiated with
//! respect to each group of parameters: the text encoder, the cross-attention's keys and values,
//! the rest of the UNet. A wrong or missing gradient on the text path shows up as a model that
//! never learns to read its prompts, which is slow and expensive to notice any other way.

use candle_core::{Device, Result, Tensor, Var};
use ddpo::family::{Policy, PolicyConfig};

const CAPTIONS: [&str; 2] = ["a red circle on a blue background", "two green squares on a white background"];

/// The pretraining loss on a fixed batch of two noisy images.
fn loss(policy: &Policy, x_t: &Tensor, t: &Tensor, target: &Tensor) -> Result<Tensor> {
    let ctx = policy.encode_prompts(&CAPTIONS)?;
    (policy.unet.forward(x_t, t, &ctx)? - target)?.sqr()?.mean_all()
}

/// The directional derivative along a random direction over the variables named by `pick`,
/// analytic (from backward) and by central differences.
fn directional(policy: &Policy, pick: &dyn Fn(&str) -> bool, seed: u64) -> Result<(f64, f64, usize)> {
    let device = Device::Cpu;
    let mut noise = ddpo::sampler::NoiseRng::new(seed);
    let x_t = noise.randn((2, 3, 32, 32), &device)?;
    let target = noise.randn((2, 3, 32, 32), &device)?;
    let t = Tensor::new(&[300f32, 700.0], &device)?;
    let vars: Vec<(String, Var)> = policy.trainable_vars().into_iter().filter(|(n, _)| pick(n)).collect();
    assert!(!vars.is_empty(), "no variables picked");
    let grads = loss(policy, &x_t, &t, &target).and_then(|l| l.backward())?;
    let mut analytic = 0f64;
    let mut directions = Vec::new();
    for (name, var) in &vars {
        let d = noise.randn(var.shape(), &device)?;
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        analytic += (g * &d)?.sum_all()?.to_scalar::<f32>()? as f64;
        directions.push(d);
    }
    let shift = |sign: f64| -> Result<f64> {
        for ((_, var), d) in vars.iter().zip(&directions) {
            var.set(&(var.as_tensor() + (d * sign)?)?)?;
        }
        let l = loss(policy, &x_t, &t, &target)?.to_scalar::<f32>()? as f64;
        for ((_, var), d) in vars.iter().zip(&directions) {
            var.set(&(var.as_tensor() - (d * sign)?)?)?;
        }
        Ok(l)
    };
    // Central differences at eps and eps/2, Richardson-extrapolated to cancel the eps² term.
    let central = |eps: f64| -> Result<f64> { Ok((shift(eps)? - shift(-eps)?) / (2.0 * eps)) };
    let (coarse, fine) = (central(2e-3)?, central(1e-3)?);
    eprintln!("  central differences: {coarse:.6e} (eps 2e-3), {fine:.6e} (eps 1e-3)");
    let numeric = (4.0 * fine - coarse) / 3.0;
    Ok((analytic, numeric, vars.len()))
}

fn check(config: PolicyConfig, what: &str) {
    let policy = Policy::new_random(config, 0, &Device::Cpu).unwrap();
    let groups: [(&str, &dyn Fn(&str) -> bool); 3] = [
        ("text encoder", &|n: &str| n.starts_with("text")),
        ("cross-attention keys and values", &|n: &str| n.contains("attn2.to_k") || n.contains("attn2.to_v")),
        ("the rest of the UNet", &|n: &str| n.starts_with("unet") && !n.contains("attn2")),
    ];
    for (seed, (group, pick)) in groups.iter().enumerate() {
        let (analytic, numeric, n) = directional(&policy, pick, seed as u64 + 1).unwrap();
        let err = (analytic - numeric).abs() / numeric.abs().max(1e-6);
        eprintln!("{what} {group} ({n} tensors): analytic {analytic:.6e} numeric {numeric:.6e} rel err {err:.2e}");
        assert!(numeric.abs() > 1e-5, "{what} {group}: the loss does not depend on these weights ({numeric:e})");
        assert!(err < 2e-2, "{what} {group}: analytic {analytic:e} vs finite differences {numeric:e}");
    }
}

#[test]
fn v1_policy_gradient_matches_finite_differences() {
    check(PolicyConfig::shapes_default(), "v1");
}

#[test]
fn v2_policy_gradient_matches_finite_differences() {
    check(PolicyConfig::shapes_v2(), "v2");
}
