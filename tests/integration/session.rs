//! The session over a model family it knows nothing about: the test-double Gaussian family
//! trains through the real trainer and session, resumes exactly, and logs the learning rate it
//! applies.

use crate::common;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use common::fixtures::{metrics, small_config};
use common::gaussian::GaussianFamily;
use ddpo::ddpo::{Normalisation, TrainConfig};
use ddpo::family::{Family, SamplerConfig};
use ddpo::optim::AdamWConfig;
use ddpo::run::{RewardSpec, RunConfig};
use ddpo::session::{EpochLog, Ended, Observer, ScriptPaths, Session};

fn train_config() -> TrainConfig {
    TrainConfig {
        samples_per_epoch: 16,
        sample_batch_size: 8,
        train_batch_size: 8,
        normalisation: Normalisation::Batch,
        optimizer: AdamWConfig { lr: 0.05, warmup_steps: 4, ..Default::default() },
        sampler: SamplerConfig::new(4, 1.0, 1.0),
        min_train_sigma: 0.0,
        seed: 9,
        ..small_config()
    }
}

fn run_config(epochs: usize) -> RunConfig {
    RunConfig {
        train: train_config(),
        model: "gaussian".into(),
        reward: RewardSpec::Builtin("brightness".into()),
        prompts: vec!["a red circle on a blue background".into()],
        epochs,
        checkpoint_every: 2,
        ranks: 1,
        lora: None,
        dtype: Default::default(),
        reward_models: Default::default(),
        clip_sample: None,
        eval: None,
    }
}

/// Opens the Gaussian family, whatever the config's model path says.
fn open_gaussian(_: &RunConfig, _frozen: bool) -> anyhow::Result<Box<dyn Family>> {
    Ok(Box::new(GaussianFamily::new(-0.5)))
}

#[derive(Default)]
struct Record {
    lines: Vec<String>,
    rewards: Vec<f64>,
}

impl Observer for Record {
    fn line(&mut self, text: &str) {
        self.lines.push(text.to_string());
    }
    fn epoch(&mut self, e: &EpochLog) {
        self.rewards.push(e.metrics["reward_mean"].as_f64().unwrap());
    }
}

fn create(dir: &Path, epochs: usize) -> Session {
    let quiet = Arc::new(|_: &str| {});
    Session::create_with(dir, run_config(epochs), ScriptPaths::default(), quiet, &Device::Cpu, &open_gaussian).unwrap()
}

#[test]
fn the_gaussian_family_trains_through_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut session = create(dir.path(), 8);
    let theta = |s: &Session| s.trainer().policy().trainable_vars()[0].1.as_tensor().mean_all().unwrap().to_scalar::<f32>().unwrap();
    let before = theta(&session);
    let mut record = Record::default();
    let ended = session.train(8, &mut record, &AtomicBool::new(false)).unwrap();
    assert_eq!(ended, Ended::Done);
    let after = theta(&session);
    println!("theta {before:.3} -> {after:.3}, rewards {:?}", record.rewards);
    // Brighter images need a larger theta: the policy gradient must find that.
    assert!(after > before + 0.1, "theta {before} -> {after}");
    let (first, last) = (record.rewards[..2].iter().sum::<f64>(), record.rewards[6..].iter().sum::<f64>());
    assert!(last > first + 0.05, "reward {:?}", record.rewards);
    assert_eq!(metrics(dir.path()).len(), 8);
    assert!(dir.path().join("checkpoint/policy.safetensors").exists());
}

#[test]
fn the_logged_learning_rate_is_the_one_applied_during_warm_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut session = create(dir.path(), 3);
    session.train(3, &mut Record::default(), &AtomicBool::new(false)).unwrap();
    // Two optimiser steps per epoch (16 samples, train batch 8); warm-up over 4 steps: the last
    // step of epoch 0 is step 2 (lr * 2/4), of epoch 1 step 4 (the full rate).
    let lrs: Vec<f64> = metrics(dir.path()).iter().map(|m| m["lr"].as_f64().unwrap()).collect();
    assert_eq!(lrs.len(), 3);
    assert!((lrs[0] - 0.05 * 2.0 / 4.0).abs() < 1e-12, "{lrs:?}");
    assert!((lrs[1] - 0.05).abs() < 1e-12, "{lrs:?}");
}

#[test]
fn a_resumed_session_continues_the_same_run() {
    let straight = tempfile::tempdir().unwrap();
    create(straight.path(), 4).train(4, &mut Record::default(), &AtomicBool::new(false)).unwrap();

    let resumed = tempfile::tempdir().unwrap();
    let mut first = create(resumed.path(), 4);
    // Stopped after epoch 1 as Ctrl-C would: the session checkpoints and returns.
    let stop = AtomicBool::new(true);
    assert_eq!(first.train(4, &mut Record::default(), &stop).unwrap(), Ended::Interrupted { epoch: 0 });
    drop(first);
    let quiet = Arc::new(|_: &str| {});
    let mut again = Session::resume_with(resumed.path(), None, quiet, &Device::Cpu, &open_gaussian).unwrap();
    assert_eq!(again.trainer().epoch(), 1);
    again.train(4, &mut Record::default(), &AtomicBool::new(false)).unwrap();
    assert_eq!(metrics(straight.path()), metrics(resumed.path()));
}
