//! Seeded weight initialisation. candle draws initial weights from an unseeded generator, so two
//! runs with the same `--seed` would start from different networks; this VarBuilder backend
//! draws each new variable from a generator seeded by (run seed, variable name) and registers it
//! in a [`VarMap`] for training. Same seed, same network, whatever the construction order.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// A VarBuilder whose new variables are initialised deterministically from `seed` into `varmap`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(SeededVarMap { varmap: varmap.clone(), seed });
    VarBuilder::from_backend(backend, DType::F32, device.clone())
}

/// FNV-1a: a stable hash of the variable name (std's hasher is not stable across releases).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn sample(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let uniform = |lo: f64, up: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
        let d = Uniform::new(lo as f32, up as f32).expect("lo < up");
        (0..n).map(|_| d.sample(rng)).collect()
    };
    let normal = |mean: f64, std: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
        let d = Normal::new(mean as f32, std as f32).expect("std >= 0");
        (0..n).map(|_| d.sample(rng)).collect()
    };
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Randn { mean, stdev } => normal(mean, stdev, rng),
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => uniform(-(3f64.sqrt()) * std, 3f64.sqrt() * std, rng),
                NormalOrUniform::Normal => normal(0.0, std, rng),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("variable {name}: shape {:?} requested, {:?} exists", shape, var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name));
        let _ = rng.random::<u64>(); // decorrelate nearby seeds
        let values = sample(init, &shape, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        match data.get(name) {
            Some(var) => var.as_tensor().to_device(dev)?.to_dtype(dtype),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().expect("varmap lock").contains_key(name)
    }
}
