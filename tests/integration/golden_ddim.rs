//! The DDIM schedule matches diffusers' on the tiny-sd fixture.

use candle_core::{Device, Tensor};
use ddpo::family::ddpm::{NoiseSchedule, ScheduleConfig};

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

// The DDIM step's log-probs against the reference: `ddpo::selftest::sd` (tests/integration/golden_unet.rs).
