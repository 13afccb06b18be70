//! The real-Stable-Diffusion path on the tiny-sd fixture: our CLIP tokenizer and VAE decoder
//! reproduce transformers / diffusers, and our tokenizer + text encoder + guided UNet + DDIM step
//! recompute every transition log-prob of a trajectory sampled by the DDPO reference
//! (kvablack/ddpo-pytorch `pipeline_with_logprob`), which checks the whole DDPO policy end to end.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use ddpo::model::{TextConfig, TextEncoder, UNet2DConditionModel, UNetConfig};
use ddpo::family::ddpm::{ddim_step, NoiseSchedule, ScheduleConfig};
use ddpo::family::sd::{guide, post_process, ClipTokenizer, Vae, MAX_LEN};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
const PROMPTS: [&str; 2] = ["a photo of a cat", "an astronaut riding a horse on the moon"];
const STEPS: usize = 20;
const ETA: f64 = 1.0;

fn golden() -> Result<HashMap<String, Tensor>> {
    let path = format!("{FIXTURE}/golden.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("loading {path}"))
}

fn tensor<'a>(g: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    g.get(key)
        .with_context(|| format!("golden.safetensors: no tensor {key}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

fn read_json<T: serde::de::DeserializeOwned>(rel: &str) -> Result<T> {
    let path = format!("{FIXTURE}/{rel}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {path}"))
}

fn var_builder(rel: &str) -> Result<VarBuilder<'static>> {
    let path = format!("{FIXTURE}/{rel}");
    // SAFETY: fixture files are mapped read-only and never written during the tests.
    unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu) }
        .with_context(|| format!("opening {path}"))
}

fn tokenizer() -> Result<ClipTokenizer> {
    ClipTokenizer::from_dir(format!("{FIXTURE}/tokenizer"))
}

/// Token ids of `prompts` as a (N, 77) u32 tensor.
fn encode_batch(tok: &ClipTokenizer, prompts: &[&str]) -> Result<Tensor> {
    let mut ids = Vec::new();
    for p in prompts {
        ids.extend(tok.encode(p)?);
    }
    Ok(Tensor::from_vec(ids, (prompts.len(), MAX_LEN), &Device::Cpu)?)
}

#[test]
fn tokenizer_reproduces_clip_input_ids() -> Result<()> {
    let g = golden()?;
    let tok = tokenizer()?;
    let cases = [("text.input_ids", PROMPTS), ("text.uncond_input_ids", ["", ""])];
    for (key, prompts) in cases {
        let want: Vec<Vec<i64>> = tensor(&g, key)?.to_vec2()?;
        for (p, want) in prompts.iter().zip(want) {
            let ours: Vec<i64> = tok.encode(p)?.into_iter().map(i64::from).collect();
            assert_eq!(ours, want, "{key}: {p:?}");
        }
    }
    Ok(())
}

#[test]
fn tokenizer_truncates_long_prompts_to_77_ending_in_eos() -> Result<()> {
    let tok = tokenizer()?;
    let ids = tok.encode(&"a horse, ".repeat(60))?;
    assert_eq!(ids.len(), MAX_LEN);
    assert_eq!((ids[0], ids[MAX_LEN - 1]), (49406, 49407));
    let short = tok.encode("  A   Photo of a CAT ")?;
    assert_eq!(
        short,
        tok.encode("a photo of a cat")?,
        "whitespace clean-up and lower-casing"
    );
    Ok(())
}

#[test]
fn tokenizer_errors_name_the_missing_file() {
    let err = ClipTokenizer::from_dir(format!("{FIXTURE}/no-such-dir")).unwrap_err();
    assert!(format!("{err:#}").contains("vocab.json"), "{err:#}");
    let err = Vae::from_dir(format!("{FIXTURE}/no-such-dir"), &Device::Cpu)
        .err()
        .expect("no VAE there");
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
}

// The VAE decode against diffusers: `ddpo::selftest::sd` (tests/integration/golden_unet.rs).

/// Text encoder hidden states of the prompts and of the empty prompt, each (2, 77, D).
fn text_states(tok: &ClipTokenizer) -> Result<(Tensor, Tensor)> {
    let cfg: TextConfig = read_json("text_encoder/config.json")?;
    let enc = TextEncoder::new(&cfg, var_builder("text_encoder/model.safetensors")?)?;
    let cond = enc.forward(&encode_batch(tok, &PROMPTS)?)?;
    let uncond = enc.forward(&encode_batch(tok, &["", ""])?)?;
    Ok((cond, uncond))
}

#[test]
fn guided_ddim_policy_recomputes_reference_trajectory_log_probs() -> Result<()> {
    let g = golden()?;
    let (cond, uncond) = text_states(&tokenizer()?)?;
    let unet_cfg: UNetConfig = read_json("unet/config.json")?;
    let unet = UNet2DConditionModel::new(&unet_cfg, var_builder("unet/diffusion_pytorch_model.safetensors")?)?;
    let schedule = NoiseSchedule::new(read_json::<ScheduleConfig>("scheduler/scheduler_config.json")?)?;
    let scale = tensor(&g, "traj.guidance")?.to_vec1::<f32>()?[0] as f64;
    let latents = tensor(&g, "traj.latents")?;
    let want = tensor(&g, "traj.log_probs")?;
    let context = Tensor::cat(&[&uncond, &cond], 0)?;
    let mut ours = Vec::new();
    for (i, t) in schedule.ddim_timesteps(STEPS).into_iter().enumerate() {
        let (x, x_prev) = (latents.i((.., i))?, latents.i((.., i + 1))?);
        let t_in = Tensor::full(t as f32, 4, &Device::Cpu)?;
        let eps = unet.forward(&Tensor::cat(&[&x, &x], 0)?, &t_in, &context)?;
        let eps = guide(&eps.i(0..2)?, &eps.i(2..4)?, scale)?;
        let step = ddim_step(&schedule, &eps, &[t, t], &x, STEPS, ETA, Some(&x_prev), None)?;
        ours.push(step.log_prob);
    }
    let ours = Tensor::stack(&ours, 1)?;
    let err = max_abs_diff(&ours, want)?;
    println!(
        "traj.log_probs: max abs error {err:e} (values {:?})",
        want.to_vec2::<f32>()?[0]
    );
    assert!(err < 1e-3, "traj.log_probs: max abs error {err}");

    let vae = Vae::from_dir(format!("{FIXTURE}/vae"), &Device::Cpu)?;
    let images = post_process(&vae.decode(&latents.i((.., STEPS))?)?)?;
    let err = max_abs_diff(&images, tensor(&g, "traj.images")?)?;
    println!("traj.images: max abs error {err:e}");
    assert!(err < 1e-4, "traj.images: max abs error {err}");
    Ok(())
}
