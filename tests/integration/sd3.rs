//! The SD3 / SD3.5 MMDiT (`ddpo::family::sd3`) against diffusers on the tiny-sd3 fixture (CPU,
//! f32): the velocity of an SD3.5-style model (QK RMSNorm, MMDiT-X dual attention) and of an
//! SD3-style one, the gradients of a probe loss against PyTorch's autograd and against finite
//! differences, LoRA adapters, and the loader's errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpo::family::sd3::{Sd3Config, Sd3Transformer};
use ddpo::model::{Lora, LoraConfig};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd3")
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// The model's velocity on the golden inputs.
fn velocity(model: &Sd3Transformer, g: &HashMap<String, Tensor>) -> Result<Tensor> {
    model.forward(&g["latent"], &g["timestep"], &g["encoder_hidden_states"], &g["pooled_projections"])
}

fn check_output(variant: &str) {
    let g = golden();
    let model = Sd3Transformer::load(&fixture().join(variant), DType::F32, &Device::Cpu, None).unwrap();
    let out = velocity(&model, &g).unwrap();
    let want = &g[&format!("{variant}.output")];
    let err = max_abs_diff(&out, want);
    println!("{variant}: velocity max abs error {err:.3e} (output max |v| {:.3})", max_abs(want));
    assert!(err < 1e-4, "{variant}: velocity differs from diffusers by {err:e}");
}

#[test]
fn sd35_style_velocity_matches_diffusers() {
    check_output("transformer");
}

#[test]
fn sd3_style_velocity_matches_diffusers() {
    check_output("transformer-sd3");
}

/// The position embedding cached for one latent shape is not reused for another with as many
/// patches (12x16 then 16x12 latents).
#[test]
fn position_embedding_follows_the_latent_shape() {
    let g = golden();
    let dir = fixture().join("transformer");
    let load = || Sd3Transformer::load(&dir, DType::F32, &Device::Cpu, None).unwrap();
    let tall = g["latent"].transpose(2, 3).unwrap().contiguous().unwrap();
    let run = |m: &Sd3Transformer, x: &Tensor| m.forward(x, &g["timestep"], &g["encoder_hidden_states"], &g["pooled_projections"]).unwrap();
    let model = load();
    run(&model, &g["latent"]);
    let err = max_abs_diff(&run(&model, &tall), &run(&load(), &tall));
    assert!(err == 0.0, "a 16x12 latent after a 12x16 one differs by {err:e}");
}

/// Half-precision weights (the GPU's dtypes) take candle's generic ops instead of the CPU f32
/// kernels; f16 runs on the CPU too, so that path is checked here, against the f32 golden.
#[test]
fn f16_weights_stay_close_to_diffusers() {
    let g = golden();
    let model = Sd3Transformer::load(&fixture().join("transformer"), DType::F16, &Device::Cpu, None).unwrap();
    let half = |k: &str| g[k].to_dtype(DType::F16).unwrap();
    let out = model.forward(&half("latent"), &g["timestep"], &half("encoder_hidden_states"), &half("pooled_projections")).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let err = max_abs_diff(&out.to_dtype(DType::F32).unwrap(), &g["transformer.output"]);
    println!("f16: velocity max abs error {err:.3e}");
    assert!(err < 1e-2, "f16 velocity differs from diffusers' f32 by {err:e}");
}

/// The probe loss diffusers' gradients were taken of: sum(velocity * probe).
fn probe_loss(model: &Sd3Transformer, g: &HashMap<String, Tensor>) -> Result<Tensor> {
    (velocity(model, g)? * &g["probe"])?.sum_all()
}

fn check_gradients(variant: &str) {
    let g = golden();
    let (model, varmap) = Sd3Transformer::load_trainable(&fixture().join(variant), &Device::Cpu).unwrap();
    let grads = probe_loss(&model, &g).unwrap().backward().unwrap();
    let vars = varmap.data().lock().unwrap().clone();
    let prefix = format!("{variant}.grad.");
    let mut checked = 0;
    for (key, want) in g.iter().filter(|(k, _)| k.starts_with(&prefix)) {
        let name = &key[prefix.len()..];
        let var = vars.get(name).unwrap_or_else(|| panic!("{variant}: no variable {name}"));
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{variant}: {name} has no gradient"));
        let (err, scale) = (max_abs_diff(got, want), max_abs(want));
        println!("{variant}: d loss / d {name}: max abs error {err:.3e}, max |grad| {scale:.3e}");
        assert!(scale > 0.0 && max_abs(got).is_finite(), "{name}: gradient is zero or not finite");
        assert!(err <= 1e-4 * scale.max(1.0), "{variant}: gradient of {name} differs from PyTorch's by {err:e}");
        checked += 1;
    }
    assert!(checked >= 6, "{variant}: only {checked} gradients in the golden file");
}

#[test]
fn sd35_style_gradients_match_pytorch() {
    check_gradients("transformer");
}

#[test]
fn sd3_style_gradients_match_pytorch() {
    check_gradients("transformer-sd3");
}

/// The loss's derivative along a random direction over every weight, from backward and from
/// central differences (Richardson-extrapolated), on the SD3.5-style fixture.
#[test]
fn gradient_matches_finite_differences() {
    let g = golden();
    let (model, varmap) = Sd3Transformer::load_trainable(&fixture().join("transformer"), &Device::Cpu).unwrap();
    let mut vars: Vec<(String, Var)> = varmap.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0)); // the same directions every run
    let loss = |m: &Sd3Transformer| probe_loss(m, &g).unwrap().to_scalar::<f32>().unwrap() as f64;
    let grads = probe_loss(&model, &g).unwrap().backward().unwrap();
    let last_attn = format!("transformer_blocks.{}.attn.", model.config.num_layers - 1);
    let mut noise = ddpo::sampler::NoiseRng::new(7);
    let mut analytic = 0f64;
    let mut directions = Vec::new();
    for (name, var) in &vars {
        let d = noise.randn(var.shape(), &Device::Cpu).unwrap();
        match grads.get(var.as_tensor()) {
            Some(grad) => analytic += (grad * &d).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64,
            // The last block's text queries are never read (`context_pre_only`), as in diffusers.
            None => assert!(name.starts_with(&last_attn) && (name.contains("add_q_proj") || name.contains("norm_added_q")), "{name} has no gradient"),
        }
        directions.push(d);
    }
    let shift = |step: f64| {
        for ((_, var), d) in vars.iter().zip(&directions) {
            var.set(&(var.as_tensor() + (d * step).unwrap()).unwrap()).unwrap();
        }
    };
    let central = |eps: f64| {
        shift(eps);
        let up = loss(&model);
        shift(-2.0 * eps);
        let down = loss(&model);
        shift(eps);
        (up - down) / (2.0 * eps)
    };
    let (coarse, fine) = (central(2e-3), central(1e-3));
    let numeric = (4.0 * fine - coarse) / 3.0;
    let err = (analytic - numeric).abs() / numeric.abs();
    println!("directional derivative over {} weights: analytic {analytic:.6e}, numeric {numeric:.6e}, rel err {err:.2e}", vars.len());
    assert!(numeric.abs() > 1e-3, "the loss barely depends on the weights ({numeric:e})");
    assert!(err < 1e-2, "analytic {analytic:e} vs finite differences {numeric:e}");
}

/// Fresh adapters (B = 0) leave the velocity unchanged and receive gradients, and their names
/// are the peft names diffusers' LoRA loader reads.
#[test]
fn lora_adapters_start_neutral_and_train() {
    let g = golden();
    let dir = fixture().join("transformer");
    let plain = Sd3Transformer::load(&dir, DType::F32, &Device::Cpu, None).unwrap();
    let varmap = VarMap::new();
    let lora = Lora::new(LoraConfig { rank: 2, alpha: 2.0 }, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    let adapted = Sd3Transformer::load(&dir, DType::F32, &Device::Cpu, Some(&lora)).unwrap();
    let err = max_abs_diff(&velocity(&adapted, &g).unwrap(), &velocity(&plain, &g).unwrap());
    assert!(err == 0.0, "fresh adapters changed the output by {err:e}");
    let vars = varmap.data().lock().unwrap().clone();
    // 3 blocks x 4 image projections + 2 text-stream outputs + 3 x 3 text qkv, + attn2's 4.
    assert_eq!(vars.len(), 2 * (3 * 4 + 2 + 3 * 3 + 4), "adapter names: {:?}", vars.keys().collect::<Vec<_>>());
    for name in ["transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.1.attn.to_add_out.lora_B.weight", "transformer_blocks.0.attn2.to_out.0.lora_B.weight"] {
        assert!(vars.contains_key(name), "no adapter {name}");
    }
    let grads = probe_loss(&adapted, &g).unwrap().backward().unwrap();
    let up = &vars["transformer_blocks.0.attn.to_q.lora_B.weight"];
    let grad = grads.get(up.as_tensor()).expect("lora_B has no gradient");
    assert!(max_abs(grad) > 0.0, "lora_B's gradient is zero");
}

/// Our position embedding, computed for the whole 16x16 grid, is the table diffusers saved.
#[test]
fn position_embedding_matches_the_saved_table() {
    let dir = fixture().join("transformer");
    let cfg = Sd3Config::from_file(&dir.join("config.json")).unwrap();
    let saved = candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(saved.clone(), DType::F32, &Device::Cpu);
    let embed = ddpo::family::sd3::embed::PatchEmbed::new(&cfg, vb.pp("pos_embed")).unwrap();
    let n = cfg.pos_embed_max_size;
    let ours = embed.cropped_pos_embed(n, n, &Device::Cpu).unwrap();
    let err = max_abs_diff(&ours, &saved["pos_embed.pos_embed"].squeeze(0).unwrap());
    assert!(err < 1e-6, "position embedding differs from diffusers' table by {err:e}");
}

/// A weight source that only records what the model asks for: every weight is one broadcast
/// zero, so a model of billions of parameters builds in no memory.
#[derive(Clone, Default)]
struct ShapeRecorder(std::sync::Arc<std::sync::Mutex<Vec<(String, usize)>>>);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.elem_count()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: the recorder needs shapes")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The real SD3.5-Medium architecture (its published config) builds with exactly the parameters
/// diffusers' model has: 2,243,171,520 in 908 tensors (counted in diffusers 0.42.1 on the meta
/// device; its 384² x 1536 position table, a buffer we compute, comes on top: 2.47B in all).
#[test]
fn sd35_medium_has_diffusers_parameter_count() {
    let cfg = Sd3Config::sd35_medium();
    let recorder = ShapeRecorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    Sd3Transformer::new(&cfg, vb, None).unwrap();
    let weights = recorder.0.lock().unwrap();
    let params: usize = weights.iter().map(|(_, n)| n).sum();
    println!("SD3.5-Medium transformer: {params} parameters in {} tensors", weights.len());
    assert_eq!((params, weights.len()), (2_243_171_520, 908));
}

/// A random model at SD3.5-Medium's real widths (head dim 64, 24 heads, 4096-wide text states,
/// the 384-square position table) made by `make_golden.py --real-width DIR`, which is too large
/// to commit: `SD3_REAL_WIDTH_DIR=DIR cargo test --test integration sd3:: -- --ignored`.
#[test]
#[ignore = "needs a model made by make_golden.py --real-width (1.6 GB at 2 blocks)"]
fn real_width_sd35_medium_matches_diffusers() {
    let dir = PathBuf::from(std::env::var("SD3_REAL_WIDTH_DIR").expect("set SD3_REAL_WIDTH_DIR"));
    let g = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    let model = Sd3Transformer::load(&dir.join("transformer"), DType::F32, &Device::Cpu, None).unwrap();
    let err = max_abs_diff(&velocity(&model, &g).unwrap(), &g["output"]);
    println!("real-width SD3.5-Medium, {} blocks: velocity max abs error {err:.3e} (max |v| {:.3})", model.config.num_layers, max_abs(&g["output"]));
    assert!(err < 1e-4, "velocity differs from diffusers by {err:e}");
}

/// A copy of the SD3.5-style fixture folder in a temporary directory, to break.
fn copy_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture().join("transformer").join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn load_error(dir: &Path) -> String {
    let err = Sd3Transformer::load(dir, DType::F32, &Device::Cpu, None).expect_err("loading should fail");
    println!("error: {err:#}");
    format!("{err:#}")
}

#[test]
fn missing_config_is_named() {
    let tmp = copy_fixture();
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains(&tmp.path().join("config.json").display().to_string()), "{msg}");
}

#[test]
fn config_missing_a_field_names_the_file_and_field() {
    let tmp = copy_fixture();
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("num_layers");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains(&path.display().to_string()) && msg.contains("num_layers"), "{msg}");
}

#[test]
fn inconsistent_config_names_the_file_and_field() {
    let tmp = copy_fixture();
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["caption_projection_dim"] = 48.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains(&path.display().to_string()) && msg.contains("caption_projection_dim"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = copy_fixture();
    let path = tmp.path().join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let gone = "transformer_blocks.1.attn.norm_added_k.weight";
    tensors.remove(gone).unwrap();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains(gone), "{msg}");
    let trainable = Sd3Transformer::load_trainable(tmp.path(), &Device::Cpu).map(|_| ()).expect_err("loading should fail");
    assert!(format!("{trainable:#}").contains(gone), "{trainable:#}");
}

/// An SD3.5 file read with SD3's config fields: the tensor that does not fit is named (the QK
/// norms left over are not silently dropped; MMDiT-X's 9-vector norm1 has the wrong shape).
#[test]
fn weights_that_do_not_fit_the_config_are_named() {
    for (field, value, named) in [
        ("qk_norm", serde_json::Value::Null, "transformer_blocks.0.attn.norm_added_k.weight"),
        ("dual_attention_layers", serde_json::json!([]), "transformer_blocks.0.norm1.linear.weight"),
    ] {
        let tmp = copy_fixture();
        let path = tmp.path().join("config.json");
        let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[field] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let msg = load_error(tmp.path());
        assert!(msg.contains(named), "{field}: {msg}");
        let trainable = Sd3Transformer::load_trainable(tmp.path(), &Device::Cpu).map(|_| ()).expect_err("loading should fail");
        assert!(format!("{trainable:#}").contains(named), "{trainable:#}");
    }
}

/// Weights sharded as diffusers saves large checkpoints (an index naming two files) load the same.
#[test]
fn sharded_weights_load() {
    let tmp = copy_fixture();
    let single = tmp.path().join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let (mut first, mut second, mut map) = (HashMap::new(), HashMap::new(), serde_json::Map::new());
    for (name, t) in tensors {
        let (shard, file) = if name.starts_with("transformer_blocks") { (&mut second, "b.safetensors") } else { (&mut first, "a.safetensors") };
        map.insert(name.clone(), file.into());
        shard.insert(name, t);
    }
    candle_core::safetensors::save(&first, tmp.path().join("a.safetensors")).unwrap();
    candle_core::safetensors::save(&second, tmp.path().join("b.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(tmp.path().join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    let g = golden();
    let model = Sd3Transformer::load(tmp.path(), DType::F32, &Device::Cpu, None).unwrap();
    let err = max_abs_diff(&velocity(&model, &g).unwrap(), &g["transformer.output"]);
    assert!(err < 1e-4, "sharded weights: velocity differs from diffusers by {err:e}");
    let (trainable, _) = Sd3Transformer::load_trainable(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&velocity(&trainable, &g).unwrap(), &velocity(&model, &g).unwrap()), 0.0);
}

#[test]
fn missing_weights_are_named() {
    let tmp = copy_fixture();
    std::fs::remove_file(tmp.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let msg = load_error(tmp.path());
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}
