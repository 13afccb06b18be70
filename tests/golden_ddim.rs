//! Our DDIM step reproduces the DDPO reference's `ddim_step_with_logprob` on the tiny-sd fixture,
//! and the schedule matches diffusers'.

use candle_core::{DType, Device, Tensor};
use ddpo::family::ddpm::{ddim_step, NoiseSchedule, ScheduleConfig};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");

fn golden() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{FIXTURE}/golden.safetensors"), &Device::Cpu).unwrap()
}

fn schedule() -> NoiseSchedule {
    let text = std::fs::read_to_string(format!("{FIXTURE}/scheduler/scheduler_config.json")).unwrap();
    NoiseSchedule::new(serde_json::from_str::<ScheduleConfig>(&text).unwrap()).unwrap()
}

#[test]
fn schedule_matches_diffusers_alphas_and_timesteps() {
    let g = golden();
    let s = schedule();
    let want: Vec<f32> = g["sched.alphas_cumprod"].to_vec1().unwrap();
    let err = want
        .iter()
        .zip(s.alphas_cumprod())
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-6, "alphas_cumprod max error {err}");
    let ts: Vec<i64> = g["sched.timesteps"].to_vec1().unwrap();
    let ours: Vec<i64> = s.ddim_timesteps(20).iter().map(|&t| t as i64).collect();
    assert_eq!(ours, ts);
}

#[test]
fn ddim_step_log_prob_matches_reference() {
    let g = golden();
    let s = schedule();
    let ts: Vec<i64> = g["sched.timesteps"].to_vec1().unwrap();
    for (name, idx) in [("step_mid", 10), ("step_last", 19)] {
        let t = ts[idx] as usize;
        assert_eq!(g[&format!("{name}.timestep")].to_vec1::<i64>().unwrap()[0], t as i64);
        let out = ddim_step(
            &s,
            &g["unet.eps_guided_5"],
            &[t, t],
            &g["unet.latents"],
            20,
            1.0,
            Some(&g[&format!("{name}.prev_sample")]),
            None,
        )
        .unwrap();
        let ours: Vec<f32> = out.log_prob.to_vec1().unwrap();
        let want: Vec<f32> = g[&format!("{name}.log_prob")].to_vec1().unwrap();
        let err = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        println!("{name}: log_prob ours {ours:?} reference {want:?} max abs error {err:e}");
        assert!(err < 1e-4, "{name}: {ours:?} vs {want:?}");
        assert!(out.mean.dtype() == DType::F32);
    }
}
