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

/// A UNet whose timestep embedding also carries the pooled caption (`addition_embed_type:
/// "text"`, the embedded default's `--arch v4`) against diffusers on a tiny random model.
#[test]
fn text_time_embedding_unet_matches_diffusers() {
    use candle_core::{DType, Device, Module, Tensor};
    use ddpo::model::{TextTimeEmbedding, UNet2DConditionModel, UNetConfig};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-unet-text");
    let config: UNetConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("unet/config.json")).unwrap()).unwrap();
    let weights = [dir.join("unet/diffusion_pytorch_model.safetensors")];
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu).unwrap() };
    let g = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let max_err = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();

    let pooled = TextTimeEmbedding::new(32, 64, 4, vb.pp("add_embedding")).unwrap().forward(&g["context"]).unwrap();
    let pooled_err = max_err(&pooled, &g["add_embedding"]);
    let unet = UNet2DConditionModel::new(&config, vb).unwrap();
    let out = unet.forward(&g["x"], &g["t"], &g["context"]).unwrap();
    let out_err = max_err(&out, &g["out"]);
    println!("pooled caption max abs error {pooled_err:.2e}, UNet output {out_err:.2e}");
    assert!(pooled_err < 1e-5, "pooled caption differs from diffusers by {pooled_err}");
    assert!(out_err < 1e-5, "UNet output differs from diffusers by {out_err}");
}
