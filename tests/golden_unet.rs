//! Our UNet and text encoder reproduce diffusers / transformers on the tiny-sd fixture.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ddpo::model::{TextConfig, TextEncoder, UNet2DConditionModel, UNetConfig};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");

fn golden() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{FIXTURE}/golden.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn load_unet() -> UNet2DConditionModel {
    let cfg: UNetConfig =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURE}/unet/config.json")).unwrap())
            .unwrap();
    let path = format!("{FIXTURE}/unet/diffusion_pytorch_model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }.unwrap();
    UNet2DConditionModel::new(&cfg, vb).unwrap()
}

#[test]
fn unet_reproduces_diffusers_noise_predictions() {
    let g = golden();
    let unet = load_unet();
    let t = g["unet.timestep"].to_dtype(DType::F32).unwrap().repeat(2).unwrap();
    for (ctx, want) in [("text.hidden_uncond", "unet.eps_uncond"), ("text.hidden_cond", "unet.eps_cond")] {
        let eps = unet.forward(&g["unet.latents"], &t, &g[ctx]).unwrap();
        let err = max_abs_diff(&eps, &g[want]);
        println!("{want}: max abs error {err:e}");
        assert!(err < 1e-4, "{want}: max abs error {err}");
    }
}

#[test]
fn text_encoder_reproduces_transformers_hidden_states() {
    let g = golden();
    let cfg: TextConfig = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURE}/text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    let path = format!("{FIXTURE}/text_encoder/model.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &Device::Cpu) }.unwrap();
    let enc = TextEncoder::new(&cfg, vb).unwrap();
    for (ids, want) in [("text.input_ids", "text.hidden_cond"), ("text.uncond_input_ids", "text.hidden_uncond")] {
        let ids = g[ids].to_dtype(DType::U32).unwrap();
        let hidden = enc.forward(&ids).unwrap();
        let err = max_abs_diff(&hidden, &g[want]);
        println!("{want}: max abs error {err:e}");
        assert!(err < 1e-4, "{want}: max abs error {err}");
    }
}
