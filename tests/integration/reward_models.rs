//! Reward models: CLIP loading/preprocessing and the LAION aesthetic MLP, checked against tiny
//! randomly initialised models written by the tests themselves in the upstream naming.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use candle_transformers::models::clip::{
    self, text_model::ClipTextConfig, vision_model::ClipVisionConfig, ClipConfig, ClipModel,
};
use ddpo::reward::aesthetic::AestheticMlp;
use ddpo::reward::clip::{Clip, CLIP_MEAN, CLIP_STD};
use image::{Rgb, RgbImage};

fn tiny_config() -> ClipConfig {
    let act = clip::text_model::Activation::QuickGelu;
    ClipConfig {
        text_config: ClipTextConfig {
            vocab_size: 100,
            embed_dim: 32,
            activation: act,
            intermediate_size: 64,
            max_position_embeddings: 16,
            pad_with: None,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 16,
        },
        vision_config: ClipVisionConfig {
            embed_dim: 32,
            activation: act,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 16,
            num_channels: 3,
            image_size: 32,
            patch_size: 8,
        },
        logit_scale_init_value: 2.6592,
        image_size: 32,
    }
}

/// A tiny random CLIP in the upstream naming, saved to `path`; returns the in-memory model.
fn write_tiny_clip(path: &Path, cfg: &ClipConfig) -> (VarMap, ClipModel) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // Parameters candle-transformers would otherwise invent without storing them.
    vb.get_with_hints(
        cfg.vision_config.embed_dim,
        "vision_model.embeddings.class_embedding",
        Init::Randn { mean: 0.0, stdev: 1.0 },
    )
    .unwrap();
    vb.get_with_hints((), "logit_scale", Init::Const(2.6592)).unwrap();
    let model = ClipModel::new(vb, cfg).unwrap();
    // Layer norms start at exactly 1/0; perturb every variable so a misplaced tensor shows.
    for (_, var) in varmap.data().lock().unwrap().iter() {
        let noise = Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    varmap.save(path).unwrap();
    (varmap, model)
}

fn test_images() -> Vec<RgbImage> {
    let a =
        RgbImage::from_fn(40, 48, |x, y| Rgb([(x * 6) as u8, (y * 5) as u8, ((x + y) * 3) as u8]));
    let b = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * y) as u8, 200, (x * 7) as u8]));
    let c = RgbImage::from_pixel(64, 20, Rgb([10, 250, 128]));
    vec![a, b, c]
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

#[test]
fn clip_load_matches_in_memory_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.safetensors");
    let cfg = tiny_config();
    let (_varmap, model) = write_tiny_clip(&path, &cfg);
    let clip = Clip::load(&path, cfg.clone(), &Device::Cpu).unwrap();

    let images = test_images();
    let pixels = clip.preprocess(&images).unwrap();
    assert_eq!(pixels.dims(), &[3, 3, 32, 32]);
    let got = clip.image_embeddings(&images).unwrap();
    let want = clip::div_l2_norm(&model.get_image_features(&pixels).unwrap()).unwrap();
    assert_eq!(got.dims(), &[3, 16]);
    assert!(max_abs_diff(&got, &want) < 1e-6, "image embeddings differ");
    let norms = got.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5), "norms {norms:?}");

    // Token ids; the largest id marks end-of-text (pooling position), as in CLIP's vocabulary.
    let ids = Tensor::new(&[[1u32, 5, 7, 99, 0, 0], [3, 99, 0, 0, 0, 0]], &Device::Cpu).unwrap();
    let got_t = clip.text_embeddings(&ids).unwrap();
    let want_t = clip::div_l2_norm(&model.get_text_features(&ids).unwrap()).unwrap();
    assert_eq!(got_t.dims(), &[2, 16]);
    assert!(max_abs_diff(&got_t, &want_t) < 1e-6, "text embeddings differ");

    let sim = Clip::similarity(&got, &got_t).unwrap();
    assert_eq!(sim.dims(), &[3, 2]);
    let want_sim = want.matmul(&want_t.t().unwrap()).unwrap();
    assert!(max_abs_diff(&sim, &want_sim) < 1e-5);
    let s = sim.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(s.iter().all(|v| v.abs() <= 1.0 + 1e-5));

    // Wrong token length is an error, not a panic.
    let long = Tensor::zeros((1, 17), DType::U32, &Device::Cpu).unwrap();
    assert!(clip.text_embeddings(&long).is_err());
}

#[test]
fn clip_load_errors_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let missing = dir.path().join("nope.safetensors");
    let err = format!("{:#}", Clip::load(&missing, cfg.clone(), &Device::Cpu).unwrap_err());
    assert!(err.contains("nope.safetensors"), "{err}");

    let full = dir.path().join("full.safetensors");
    let (varmap, _) = write_tiny_clip(&full, &cfg);
    for drop in [
        "vision_model.encoder.layers.1.mlp.fc2.weight",
        "vision_model.embeddings.class_embedding",
        "text_projection.weight",
    ] {
        let mut tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        assert!(tensors.remove(drop).is_some(), "{drop} not in the upstream naming");
        let path = dir.path().join("partial.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let err = format!("{:#}", Clip::load(&path, cfg.clone(), &Device::Cpu).unwrap_err());
        assert!(err.contains("partial.safetensors") && err.contains(drop), "{err}");
        eprintln!("missing {drop}: {err}");
    }
}

#[test]
fn preprocess_constant_colour_is_exact() {
    let colour = [0u8, 128, 255];
    let dev = Device::Cpu;
    // Square at the model size (no resampling), wide and tall (resize + crop).
    for (w, h) in [(32, 32), (64, 20), (20, 50), (224, 300)] {
        let img = RgbImage::from_pixel(w, h, Rgb(colour));
        let t = ddpo::reward::clip::preprocess(&[img.clone(), img], 32, &dev).unwrap();
        assert_eq!(t.dims(), &[2, 3, 32, 32], "{w}x{h}");
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, x) in v.iter().enumerate() {
            let c = (i / (32 * 32)) % 3;
            let want = (colour[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            assert!((x - want).abs() < 1e-6, "{w}x{h} channel {c}: {x} vs {want}");
        }
    }
    // Spot values: black red channel, white blue channel.
    assert!(((0.0 - 0.48145466f32) / 0.26862954 - -1.7922626).abs() < 1e-5);
    assert!(((1.0 - 0.40821073f32) / 0.27577711 - 2.1458917).abs() < 1e-5);
    // Centre crop keeps the middle: a 96x32 image whose middle third is white.
    let img =
        RgbImage::from_fn(
            96,
            32,
            |x, _| {
                if (32..64).contains(&x) {
                    Rgb([255; 3])
                } else {
                    Rgb([0; 3])
                }
            },
        );
    let t = ddpo::reward::clip::preprocess(&[img], 32, &dev).unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().take(32 * 32).all(|x| (x - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6));
    assert!(ddpo::reward::clip::preprocess(&[], 32, &dev).is_err());
}

// ---------------------------------------------------------------------------------------------
// Aesthetic MLP

const DIMS: [usize; 6] = [8, 1024, 128, 64, 16, 1];
const NAMES: [&str; 5] = ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"];

/// Random weights in the upstream naming, as f64 row-major (weight, bias) per layer.
fn random_mlp(input: usize) -> (HashMap<String, Tensor>, Vec<(Vec<f64>, Vec<f64>)>) {
    let mut dims = DIMS;
    dims[0] = input;
    let mut tensors = HashMap::new();
    let mut f64s = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let (inp, out) = (dims[i], dims[i + 1]);
        let w = Tensor::randn(0f32, 1.0 / (inp as f32).sqrt(), (out, inp), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 0.1, out, &Device::Cpu).unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bv = b.to_vec1::<f32>().unwrap();
        f64s.push((wv.iter().map(|&x| x as f64).collect(), bv.iter().map(|&x| x as f64).collect()));
        tensors.insert(format!("{name}.weight"), w);
        tensors.insert(format!("{name}.bias"), b);
    }
    (tensors, f64s)
}

fn hand_score(x: &[f64], layers: &[(Vec<f64>, Vec<f64>)]) -> f64 {
    let mut h = x.to_vec();
    for (w, b) in layers {
        let out = b.len();
        let inp = h.len();
        h = (0..out).map(|o| b[o] + (0..inp).map(|i| w[o * inp + i] * h[i]).sum::<f64>()).collect();
    }
    h[0]
}

fn inputs(n: usize, d: usize) -> (Tensor, Vec<Vec<f64>>) {
    let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap();
    let x = ddpo::reward::clip::l2_normalize(&x).unwrap();
    let rows = x.to_vec2::<f32>().unwrap();
    (x, rows.into_iter().map(|r| r.into_iter().map(|v| v as f64).collect()).collect())
}

fn python() -> Option<&'static str> {
    let p = "/tmp/torchvenv/bin/python";
    let ok = std::process::Command::new(p)
        .args(["-c", "import torch"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(p)
}

#[test]
fn aesthetic_mlp_safetensors_and_pth_match_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let d = 8;
    let (tensors, layers) = random_mlp(d);
    let st = dir.path().join("aesthetic.safetensors");
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let mlp = AestheticMlp::load_with_input_dim(&st, d, &Device::Cpu).unwrap();
    let (x, rows) = inputs(5, d);
    let s = mlp.score(&x).unwrap();
    assert_eq!(s.dims(), &[5]);
    let s = s.to_vec1::<f32>().unwrap();
    for (got, row) in s.iter().zip(&rows) {
        let want = hand_score(row, &layers);
        assert!((*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "{got} vs {want}");
    }
    // Wrong width is an error naming the expected width.
    let (bad, _) = inputs(2, d + 1);
    let err = format!("{:#}", mlp.score(&bad).unwrap_err());
    assert!(err.contains(&d.to_string()), "{err}");

    // The original PyTorch format: the released module (nn.Sequential with dropouts) loaded
    // strictly from these weights, saved with torch.save, and its own scores as a cross-check.
    let Some(py) = python() else {
        eprintln!("SKIPPED the .pth half: /tmp/torchvenv/bin/python with torch is not available");
        return;
    };
    let json = dir.path().join("weights.json");
    let mut obj = serde_json::Map::new();
    for (name, t) in &tensors {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        obj.insert(name.clone(), serde_json::json!({"shape": t.dims(), "data": v}));
    }
    let xs: Vec<Vec<f32>> = x.to_vec2::<f32>().unwrap();
    obj.insert("__x".into(), serde_json::json!(xs));
    std::fs::write(&json, serde_json::Value::Object(obj).to_string()).unwrap();
    let pth = dir.path().join("aesthetic.pth");
    let out = dir.path().join("torch_scores.json");
    let script = r#"
import json, sys, torch, torch.nn as nn
class MLP(nn.Module):
    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16), nn.Linear(16, 1))
    def forward(self, x):
        return self.layers(x)
d = json.load(open(sys.argv[1]))
x = torch.tensor(d.pop("__x"), dtype=torch.float32)
sd = {k: torch.tensor(v["data"], dtype=torch.float32).reshape(v["shape"]) for k, v in d.items()}
m = MLP(x.shape[1])
m.load_state_dict(sd, strict=True)
m.eval()
torch.save(m.state_dict(), sys.argv[2])
with torch.no_grad():
    json.dump(m(x).squeeze(1).tolist(), open(sys.argv[3], "w"))
"#;
    let status = std::process::Command::new(py)
        .args(["-c", script])
        .arg(&json)
        .arg(&pth)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "python failed to write the .pth");
    let mlp_pth = AestheticMlp::load_with_input_dim(&pth, d, &Device::Cpu).unwrap();
    let s_pth = mlp_pth.score(&x).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(s, s_pth, "safetensors and .pth scores differ");
    let torch_scores: Vec<f64> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for (got, want) in s_pth.iter().zip(&torch_scores) {
        assert!((*got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "{got} vs torch {want}");
    }
}

#[test]
fn aesthetic_mlp_errors_name_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tensors, _) = random_mlp(768);
    // Default width 768 loads the released layout.
    let ok = dir.path().join("ok.safetensors");
    candle_core::safetensors::save(&tensors, &ok).unwrap();
    let mlp = AestheticMlp::load(&ok, &Device::Cpu).unwrap();
    assert_eq!(mlp.input_dim(), 768);
    // Wrong input width: the shape error names the tensor and the expected shape.
    let err =
        format!("{:#}", AestheticMlp::load_with_input_dim(&ok, 512, &Device::Cpu).unwrap_err());
    assert!(
        err.contains("ok.safetensors") && err.contains("layers.0.weight") && err.contains("512"),
        "{err}"
    );
    eprintln!("aesthetic wrong width: {err}");
    // Missing tensor.
    tensors.remove("layers.6.bias");
    let bad = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let err = format!("{:#}", AestheticMlp::load(&bad, &Device::Cpu).unwrap_err());
    eprintln!("aesthetic missing tensor: {err}");
    assert!(err.contains("bad.safetensors") && err.contains("layers.6.bias"), "{err}");
    // Unknown extension.
    let err =
        format!("{:#}", AestheticMlp::load(&dir.path().join("w.onnx"), &Device::Cpu).unwrap_err());
    assert!(err.contains("w.onnx"), "{err}");
}

#[test]
fn clip_aesthetic_reward_scores_clip_embeddings() {
    use ddpo::reward::aesthetic::ClipAesthetic;
    use ddpo::reward::Reward;
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let clip_path = dir.path().join("clip.safetensors");
    write_tiny_clip(&clip_path, &cfg);
    let clip = Clip::load(&clip_path, cfg.clone(), &Device::Cpu).unwrap();
    let (tensors, layers) = random_mlp(16);
    let mlp_path = dir.path().join("mlp.safetensors");
    candle_core::safetensors::save(&tensors, &mlp_path).unwrap();
    let mlp = AestheticMlp::load_with_input_dim(&mlp_path, 16, &Device::Cpu).unwrap();
    // Width mismatch between CLIP and the MLP is refused.
    let mlp8 = {
        let (t8, _) = random_mlp(8);
        let p = dir.path().join("mlp8.safetensors");
        candle_core::safetensors::save(&t8, &p).unwrap();
        AestheticMlp::load_with_input_dim(&p, 8, &Device::Cpu).unwrap()
    };
    assert!(ClipAesthetic::new(clip.clone(), mlp8).is_err());

    let reward = ClipAesthetic::new(clip.clone(), mlp).unwrap();
    let images = test_images();
    let prompts = vec!["a".to_string(); images.len()];
    let scores = reward.score(&images, &prompts).unwrap();
    assert_eq!(reward.name(), "aesthetic");
    let emb = clip.image_embeddings(&images).unwrap().to_vec2::<f32>().unwrap();
    for (s, e) in scores.iter().zip(&emb) {
        let want = hand_score(&e.iter().map(|&v| v as f64).collect::<Vec<_>>(), &layers);
        assert!((s.total - want).abs() < 1e-4 * (1.0 + want.abs()), "{} vs {want}", s.total);
        assert_eq!(s.components["aesthetic"], s.total);
    }
    assert!(reward.score(&[], &[]).unwrap().is_empty());
}

/// The original PyTorch format without needing Python: `tests/fixtures/aesthetic-tiny/` holds an
/// 8-wide LAION-layout MLP written by `torch.save` (and the same weights as safetensors), with
/// inputs and the scores PyTorch computed for them.
#[test]
fn aesthetic_mlp_loads_a_torch_saved_pth_fixture() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/aesthetic-tiny");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let rows: Vec<Vec<f32>> = serde_json::from_value(expected["x"].clone()).unwrap();
    let want: Vec<f64> = serde_json::from_value(expected["scores"].clone()).unwrap();
    let x = Tensor::new(rows, &Device::Cpu).unwrap();
    let from_pth = AestheticMlp::load_with_input_dim(&dir.join("mlp.pth"), 8, &Device::Cpu).unwrap();
    let from_st = AestheticMlp::load_with_input_dim(&dir.join("mlp.safetensors"), 8, &Device::Cpu).unwrap();
    let a = from_pth.score(&x).unwrap().to_vec1::<f32>().unwrap();
    let b = from_st.score(&x).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b, ".pth and safetensors scores differ");
    for (got, want) in a.iter().zip(&want) {
        assert!((*got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()), "{got} vs torch {want}");
    }
}
