//! Our UNet, text encoder, VAE, DDIM step and the policy seam reproduce diffusers / transformers /
//! ddpo-pytorch on the tiny-sd fixture, on the CPU in f32: the library's selftest checks
//! (`ddpo::selftest::sd`, also behind `ddpo selftest`), each with its own assertion.

use ddpo::family::WeightDtype;
use ddpo::selftest::{self, SelftestOptions};

#[test]
fn tiny_sd_golden_checks_pass_on_cpu_f32() {
    let options = SelftestOptions {
        device: candle_core::Device::Cpu,
        dtype: WeightDtype::F32,
        fixtures: selftest::default_fixtures(),
        shapes_model: std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-unet.safetensors")),
    };
    let checks = selftest::sd::checks(&options);
    assert_eq!(checks.len(), 6);
    for check in checks {
        println!("{check}");
        assert!(check.passed(), "{check}");
    }
}
