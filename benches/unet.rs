//! Full-model benches on the default configuration: one UNet forward at batch 16, one training
//! step (forward, backward, AdamW) at batch 64, and a 20-step guided DDIM sampling of 16 images.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use ddpo::optim::{AdamW, AdamWConfig};
use ddpo::family::{NoiseRng, PixelPolicy, Policy, PolicyConfig, SamplerConfig};
use ddpo::sampler;

fn policy() -> Policy {
    ddpo::kernels::alloc::reuse_freed_memory();
    Policy::new_random(PolicyConfig::shapes_default(), 0, &Device::Cpu).unwrap()
}

fn inputs(p: &Policy, n: usize) -> (Tensor, Tensor, Tensor) {
    let s = p.config.image_size;
    let x = NoiseRng::new(1).randn((n, 3, s, s), &Device::Cpu).unwrap();
    let t = Tensor::from_vec(vec![500f32; n], n, &Device::Cpu).unwrap();
    let ctx = p.encode_prompts(&vec!["a red circle on a blue background"; n]).unwrap();
    (x, t, ctx)
}

fn unet_forward(c: &mut Criterion) {
    let p = policy();
    let (x, t, ctx) = inputs(&p, 16);
    c.bench_function("unet_forward_b16", |b| b.iter(|| p.unet.forward(&x, &t, &ctx).unwrap()));
}

fn train_step(c: &mut Criterion) {
    let p = policy();
    let (x, t, _) = inputs(&p, 64);
    let mut opt = AdamW::new(p.trainable_vars(), AdamWConfig::default()).unwrap();
    let prompts = vec!["a red circle on a blue background"; 64];
    c.bench_function("train_step_b64", |b| {
        b.iter(|| {
            let ctx = p.encode_prompts(&prompts).unwrap();
            let loss = p.unet.forward(&x, &t, &ctx).unwrap().sqr().unwrap().mean_all().unwrap();
            let grads = opt.collect(&loss.backward().unwrap());
            opt.step(&grads).unwrap();
        })
    });
}

fn ddim_sampling(c: &mut Criterion) {
    let p = PixelPolicy(policy());
    let prompts = vec!["a red circle on a blue background".to_string(); 16];
    let cfg = SamplerConfig::default();
    c.bench_function("ddim_20_steps_16_images", |b| {
        b.iter(|| sampler::sample(&p, &prompts, &cfg, &mut NoiseRng::new(0)).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(10));
    targets = unet_forward, train_step, ddim_sampling
}
criterion_main!(benches);
