//! Batch sharding across CPU cores (`ddpo::kernels::shards`): the sharded noise prediction and
//! the sharded gradients match the whole batch's to floating-point rounding.

use candle_core::{Device, Tensor};
use ddpo::kernels::shards::{map_shards, shard_count, shard_ranges, sharded_backward};
use ddpo::family::{Policy, PolicyConfig};
use ddpo::sampler::NoiseRng;

const N: usize = 6;

fn setup() -> (Policy, Tensor, Tensor, Vec<String>, Tensor) {
    let policy = Policy::new_random(PolicyConfig::tiny_test(), 7, &Device::Cpu).unwrap();
    let mut rng = NoiseRng::new(1);
    let shape = (N, 3, 16, 16);
    let x = rng.randn(shape, &Device::Cpu).unwrap();
    let target = rng.randn(shape, &Device::Cpu).unwrap();
    let t = Tensor::new(&[10f32, 200., 400., 600., 800., 990.], &Device::Cpu).unwrap();
    let prompts: Vec<String> = (0..N).map(|i| if i % 2 == 0 { "a red circle".into() } else { String::new() }).collect();
    (policy, x, t, prompts, target)
}

/// Runs `f` unsharded: inside a shard, nothing is split again.
fn unsharded<R: Send>(f: impl Fn() -> R + Sync) -> R {
    map_shards(&[0..1], |_| f()).pop().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn sharded_noise_prediction_matches_the_whole_batch() {
    let (policy, x, _, prompts, _) = setup();
    let ctx = policy.encode_prompts(&prompts).unwrap();
    let ts: Vec<usize> = vec![10, 200, 400, 600, 800, 990];
    let sharded = policy.predict_eps(&x, &ts, &ctx).unwrap();
    let whole = unsharded(|| policy.predict_eps(&x, &ts, &ctx).unwrap());
    let err = max_abs_diff(&sharded, &whole);
    println!("{} shards, max abs diff {err:e}", shard_count(N, &Device::Cpu));
    assert!(err < 1e-5, "sharded eps differs by {err}");
}

#[test]
fn sharded_gradients_sum_to_the_whole_batch_gradient() {
    let (policy, x, t, prompts, target) = setup();
    let loss = |r: std::ops::Range<usize>| -> candle_core::Result<(Tensor, ())> {
        let rows = |v: &Tensor| v.narrow(0, r.start, r.len());
        let ctx = policy.encode_prompts(&prompts[r.clone()])?;
        Ok(((policy.unet.forward(&rows(&x)?, &rows(&t)?, &ctx)? - rows(&target)?)?.sqr()?.mean_all()?, ()))
    };
    // Uneven shards on purpose: the share weighting must make them add up.
    let sharded = map_shards(&[0..1], |_| {
        let parts: Vec<_> = map_shards(&shard_ranges(N, 2), |r| {
            let share = r.len() as f64 / N as f64;
            (loss(r).unwrap().0 * share).unwrap().backward().unwrap()
        });
        parts
    })
    .pop()
    .unwrap();
    let from_helper = sharded_backward(N, &Device::Cpu, loss).unwrap();
    let whole = unsharded(|| loss(0..N).unwrap().0.backward().unwrap());
    let vars = policy.trainable_vars();
    assert!(!vars.is_empty());
    let scale_of = |g: &Tensor| g.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let global = vars.iter().filter_map(|(_, v)| whole.get(v.as_tensor())).map(scale_of).fold(0f32, f32::max);
    let mut worst = 0f32;
    for (name, var) in &vars {
        let Some(w) = whole.get(var.as_tensor()) else { continue };
        let sum_of = |stores: Vec<&candle_core::backprop::GradStore>| {
            stores.iter().filter_map(|g| g.get(var.as_tensor())).fold(w.zeros_like().unwrap(), |a, g| (a + g).unwrap())
        };
        // Relative to the tensor's own scale, except for gradients that are rounding noise
        // (a key bias cannot change a softmax: its true gradient is zero).
        let scale = scale_of(w).max(1e-3 * global);
        for got in [sum_of(sharded.iter().collect()), sum_of(from_helper.iter().map(|s| &s.grads).collect())] {
            let err = max_abs_diff(&got, w) / scale;
            assert!(err < 1e-4, "{name}: sharded gradient off by {err} of its scale");
            worst = worst.max(err);
        }
    }
    println!("{} variables, worst relative gradient error {worst:e}", vars.len());
}
