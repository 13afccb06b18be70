//! The training run folder: metrics and artefacts per epoch, checkpoints that resume the same
//! run, and a bad reward that stops an epoch without touching the last checkpoint.

use crate::common;

use std::sync::Arc;

use candle_core::Device;
use common::fixtures::{metrics, prompt_source, small_config as config, tiny_family};
use ddpo::ddpo::Trainer;
use ddpo::family::Policy;
use ddpo::reward::{Brightness, Reward, Score};
use ddpo::run::{RewardSpec, RunConfig, RunDir};

fn trainer(reward: Arc<dyn Reward>) -> Trainer {
    Trainer::new(config(), tiny_family(2), reward, prompt_source()).unwrap()
}

fn run_config() -> RunConfig {
    RunConfig {
        train: config(),
        model: "tiny".into(),
        reward: RewardSpec::Builtin("brightness".into()),
        prompts: vec![],
        epochs: 3,
        checkpoint_every: 1,
        ranks: 1,
        lora: None,
        dtype: Default::default(),
        reward_models: Default::default(),
        clip_sample: None,
        eval: None,
    }
}

#[test]
fn run_folder_records_every_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = RunDir::create(dir.path(), &run_config()).unwrap();
    let mut t = trainer(Arc::new(Brightness));
    for _ in 0..2 {
        let r = t.run_epoch().unwrap();
        run.record(&r, serde_json::Value::Null).unwrap();
    }
    run.save_checkpoint(&t).unwrap();
    let m = metrics(dir.path());
    assert_eq!(m.len(), 2);
    for key in ["epoch", "reward_mean", "reward_std", "reward_min", "reward_max", "loss", "approx_kl", "clipfrac", "lr"] {
        assert!(m[1][key].is_number(), "metrics lack {key}: {}", m[1]);
    }
    for f in ["config.json", "reward.png", "samples/epoch_0000.png", "samples/epoch_0001.png", "checkpoint/policy.safetensors", "checkpoint/policy.json", "checkpoint/optimizer.safetensors", "checkpoint/state.json"] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    // The finetuned checkpoint samples like any model.
    Policy::load(&run.policy_path(), &Device::Cpu).unwrap();
    assert!(RunDir::create(dir.path(), &run_config()).is_err());
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_one() {
    let straight = tempfile::tempdir().unwrap();
    let mut run = RunDir::create(straight.path(), &run_config()).unwrap();
    let mut t = trainer(Arc::new(Brightness));
    for _ in 0..3 {
        let r = t.run_epoch().unwrap();
        run.record(&r, serde_json::Value::Null).unwrap();
    }

    let resumed = tempfile::tempdir().unwrap();
    let mut run = RunDir::create(resumed.path(), &run_config()).unwrap();
    let mut t = trainer(Arc::new(Brightness));
    let r = t.run_epoch().unwrap();
    run.record(&r, serde_json::Value::Null).unwrap();
    run.save_checkpoint(&t).unwrap();
    // An epoch that ran after the checkpoint but was lost (crash) is replayed on resume.
    let r = t.run_epoch().unwrap();
    run.record(&r, serde_json::Value::Null).unwrap();
    drop((run, t));

    let (mut run, _) = RunDir::open(resumed.path()).unwrap();
    let mut t = trainer(Arc::new(Brightness));
    run.restore(&mut t).unwrap();
    assert_eq!(t.epoch(), 1);
    for _ in 0..2 {
        let r = t.run_epoch().unwrap();
        run.record(&r, serde_json::Value::Null).unwrap();
    }
    assert_eq!(metrics(straight.path()), metrics(resumed.path()));
}

/// A reward that returns NaN for one image.
struct NanReward;

impl Reward for NanReward {
    fn name(&self) -> &str {
        "nan"
    }
    fn score(&self, images: &[image::RgbImage], _: &[String]) -> anyhow::Result<Vec<Score>> {
        Ok((0..images.len()).map(|i| Score::new(if i == 2 { f64::NAN } else { 1.0 })).collect())
    }
}

#[test]
fn nan_reward_aborts_the_epoch_naming_prompt_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path(), &run_config()).unwrap();
    let mut t = trainer(Arc::new(NanReward));
    run.save_checkpoint(&t).unwrap();
    let before = std::fs::read(dir.path().join("checkpoint/policy.safetensors")).unwrap();
    let err = format!("{:#}", t.run_epoch().unwrap_err());
    assert!(err.contains("sample 2") && err.contains("prompt") && err.contains("epoch 0"), "{err}");
    assert_eq!(t.epoch(), 0);
    assert_eq!(before, std::fs::read(dir.path().join("checkpoint/policy.safetensors")).unwrap());
}
