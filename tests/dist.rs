//! Data-parallel training under `mpirun` (cargo feature `mpi`; needs Open MPI: `.ci/run`
//! installs it): two ranks reproduce one process, a reward failing on one rank stops them all in
//! order, a killed rank fails the run and its last checkpoint resumes, and a resume with another
//! rank count is refused.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{metrics, save_tiny_policy};

/// One thread and one shard per process, so one process and two ranks do the same arithmetic
/// (only the order of the gradient sums differs).
fn ddpo_command(ranks: Option<usize>) -> Command {
    let mut c = match ranks {
        Some(n) => {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string(), env!("CARGO_BIN_EXE_ddpo")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_ddpo")),
    };
    c.env("RAYON_NUM_THREADS", "1").env("DDPO_SHARDS", "1");
    c
}

fn reward_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scripts/mean_rgb_brightness.rhai")
}

/// `ddpo train` on the tiny model with a reward script (mirrored to every rank), 16 samples in
/// batches of 4, run from `dir` (no default scripts there).
fn train(dir: &Path, ranks: Option<usize>, run: &str, extra: &[&str]) -> Output {
    let model = save_tiny_policy(dir);
    let reward = reward_script();
    let mut args = vec!["train", "--model", model.to_str().unwrap(), "--reward", reward.to_str().unwrap()];
    args.extend(["--samples-per-epoch", "16", "--sample-batch-size", "4", "--train-batch-size", "8", "--steps", "3", "--seed", "7"]);
    args.extend(["--run-dir", run]);
    args.extend(extra);
    ddpo_command(ranks).args(&args).current_dir(dir).output().unwrap()
}

fn weights(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn max_abs_diff(a: &std::collections::HashMap<String, candle_core::Tensor>, b: &std::collections::HashMap<String, candle_core::Tensor>) -> f32 {
    a.iter()
        .map(|(name, t)| (t - &b[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
        .fold(0.0, f32::max)
}

#[test]
fn two_ranks_reproduce_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let one = train(dir.path(), None, "one", &["--epochs", "3"]);
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    let two = train(dir.path(), Some(2), "two", &["--epochs", "3"]);
    let stderr = String::from_utf8_lossy(&two.stderr);
    assert!(two.status.success(), "{stderr}");
    assert!(stderr.contains("data-parallel over 2 ranks"), "{stderr}");

    let (m1, m2) = (metrics(&dir.path().join("one")), metrics(&dir.path().join("two")));
    assert_eq!((m1.len(), m2.len()), (3, 3));
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    for (a, b) in m1.iter().zip(&m2) {
        let (r1, r2) = (a["reward_mean"].as_f64().unwrap(), b["reward_mean"].as_f64().unwrap());
        let (g1, g2) = (a["grad_norm"].as_f64().unwrap(), b["grad_norm"].as_f64().unwrap());
        println!("epoch {}: reward {r1} / {r2} (rel {:.1e}), gradient norm {g1} / {g2} (rel {:.1e})", a["epoch"], rel(r1, r2), rel(g1, g2));
        assert!(rel(r1, r2) < 1e-5, "epoch {}: reward {r1} with one process, {r2} with two ranks", a["epoch"]);
        assert!(g1 > 0.0 && rel(g1, g2) < 1e-4, "epoch {}: gradient norm {g1} with one process, {g2} with two ranks", a["epoch"]);
    }
    let base = weights(&save_tiny_policy(dir.path()));
    let w1 = weights(&dir.path().join("one/checkpoint/policy.safetensors"));
    let w2 = weights(&dir.path().join("two/checkpoint/policy.safetensors"));
    let (diff, moved) = (max_abs_diff(&w1, &w2), max_abs_diff(&w1, &base));
    println!("final weights: max |one - two| {diff:.2e}, max change from the start {moved:.2e}");
    assert!(moved > 1e-6, "training did not move the weights");
    // Adam divides by the gradient's running RMS, so rounding in a near-zero gradient moves a
    // weight by up to a few per cent of a step.
    assert!(diff < 0.05 * moved, "the two runs' weights differ by {diff} (the update is {moved})");

    // Only rank 0 writes: the run folder has one grid per epoch, with all 16 samples' rewards.
    assert_eq!(std::fs::read_dir(dir.path().join("two/samples")).unwrap().count(), 3);
}

#[test]
fn a_killed_rank_fails_the_run_and_its_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_tiny_policy(dir.path());
    let reward = reward_script();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--model", model.to_str().unwrap(), "--reward", reward.to_str().unwrap(), "--run-dir", run.to_str().unwrap()];
    args.extend(["--samples-per-epoch", "16", "--sample-batch-size", "4", "--train-batch-size", "8", "--steps", "3", "--epochs", "200", "--checkpoint-every", "1"]);
    let mut mpirun = ddpo_command(Some(2)).args(&args).current_dir(dir.path()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();

    // Once two epochs are recorded, kill -9 one rank (the launcher's youngest child).
    let start = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "the run never reached epoch 2");
        std::thread::sleep(Duration::from_millis(100));
    }
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", mpirun.id(), mpirun.id())).unwrap();
    let rank = children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).max().expect("mpirun has rank processes");
    Command::new("kill").args(["-9", &rank.to_string()]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = mpirun.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the other rank kept waiting after one was killed");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(mpirun.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the run succeeded with a rank killed: {stderr}");
    println!("after kill -9 of rank process {rank}: {}", stderr.lines().filter(|l| l.contains("rank") || l.contains("signal")).collect::<Vec<_>>().join(" | "));

    // The checkpoint before the kill resumes, with as many ranks, and only with as many.
    let kept = metrics(&run).len();
    let resume = ["train", "--resume", run.to_str().unwrap(), "--epochs", &(kept + 1).to_string()];
    let alone = ddpo_command(None).args(resume).current_dir(dir.path()).output().unwrap();
    let refusal = String::from_utf8_lossy(&alone.stderr);
    assert!(!alone.status.success() && refusal.contains("mpirun -np 2"), "{refusal}");
    let resumed = ddpo_command(Some(2)).args(resume).current_dir(dir.path()).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let records = metrics(&run);
    assert_eq!(records.len(), kept + 1, "records after resuming a run killed at {kept}");
    assert_eq!(records.last().unwrap()["epoch"].as_u64().unwrap() as usize, kept);
}

#[test]
fn a_reward_failing_on_one_rank_stops_every_rank_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_tiny_policy(dir.path());
    // Throws on one of the two prompts only; with groups of 8 each rank holds one prompt's group,
    // and at seed 5 the second epoch puts the failing prompt on rank 1 alone.
    std::fs::write(dir.path().join("reward.rhai"), "fn reward(img, prompt, meta) {\n    if prompt.contains(\"green stars\") { throw \"no stars here\"; }\n    img.mean_rgb()[0]\n}\n").unwrap();
    let args = [
        "train", "--model", model.to_str().unwrap(), "--reward", "reward.rhai", "--prompt", "a red circle on a blue background",
        "--prompt", "two green stars on a white background", "--samples-per-epoch", "16", "--sample-batch-size", "4",
        "--train-batch-size", "8", "--steps", "3", "--group-size", "8", "--epochs", "2", "--seed", "5", "--run-dir", "run",
    ];
    let out = ddpo_command(Some(2)).args(args).current_dir(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 failed") && stderr.contains("no stars here") && stderr.contains("--resume run"), "{stderr}");
    assert!(!stderr.contains("MPI_ABORT"), "ranks that stop together need no abort: {stderr}");
    // Epoch 0 finished and rank 0 checkpointed before stopping.
    assert_eq!(metrics(&dir.path().join("run")).len(), 1);
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["epoch"], 1, "{state}");
}

#[test]
fn an_edited_reward_reaches_every_rank_at_the_same_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_tiny_policy(dir.path());
    let script = dir.path().join("reward.rhai");
    std::fs::write(&script, "fn reward(img, prompt, meta) { 1.0 }\n").unwrap();
    let args = [
        "train", "--model", model.to_str().unwrap(), "--reward", "reward.rhai", "--samples-per-epoch", "16", "--sample-batch-size", "4",
        "--train-batch-size", "8", "--steps", "3", "--epochs", "40", "--run-dir", "run",
    ];
    let mut mpirun = ddpo_command(Some(2)).args(args).current_dir(dir.path()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let run = dir.path().join("run");
    let start = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "the run never reached epoch 2");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Rank 1 reads nothing from this file: it runs what rank 0 sends at the next boundary.
    std::fs::write(&script, "fn reward(img, prompt, meta) { 2.0 }\n").unwrap();
    let status = mpirun.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(mpirun.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    let rewards: Vec<(f64, f64)> = metrics(&run).iter().map(|m| (m["reward_mean"].as_f64().unwrap(), m["reward_std"].as_f64().unwrap())).collect();
    println!("reward mean per epoch: {:?}", rewards.iter().map(|r| r.0).collect::<Vec<_>>());
    // Every epoch has one version on both ranks (std 0), and the switch happens once, for good.
    assert!(rewards.iter().all(|&(mean, std)| std == 0.0 && (mean == 1.0 || mean == 2.0)), "{rewards:?}");
    let switch = rewards.iter().position(|r| r.0 == 2.0).expect("the edit was never picked up");
    assert!(switch >= 2 && rewards[switch..].iter().all(|r| r.0 == 2.0), "{rewards:?}");
    assert!(stderr.contains("reloaded reward.rhai"), "{stderr}");
}
