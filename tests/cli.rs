//! The command line on bad input: one clear error line, a non-zero exit, never a panic.

use std::process::Command;

fn ddpo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "ddpo {args:?} panicked: {stderr}");
    (out.status.success(), stderr)
}

fn fails_with(args: &[&str], needle: &str) {
    let (ok, stderr) = ddpo(args);
    assert!(!ok, "ddpo {args:?} should fail");
    assert!(stderr.contains(needle), "ddpo {args:?}: expected {needle:?} in {stderr:?}");
    assert!(stderr.trim().lines().count() <= 3, "ddpo {args:?}: error is not short: {stderr}");
}

#[test]
fn sample_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    let missing = dir.path().join("missing.safetensors");
    fails_with(&["sample", "--prompt", "a red circle", "--out", out, "--model", missing.to_str().unwrap()], "not found");
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, b"not a safetensors file").unwrap();
    let config = serde_json::to_string(&ddpo::policy::PolicyConfig::tiny_test()).unwrap();
    std::fs::write(dir.path().join("corrupt.json"), config).unwrap();
    fails_with(&["sample", "--prompt", "a red circle", "--out", out, "--model", corrupt.to_str().unwrap()], "corrupt");
    fails_with(&["sample", "--prompt", "  ", "--out", out], "--prompt is empty");
    fails_with(&["sample", "--prompt", "a red circle", "-n", "0", "--out", out], "-n must be at least 1");
    fails_with(&["sample", "--prompt", "a red circle", "--out", "x.jpg"], "must end in .png");
    fails_with(&["sample", "--prompt", "a red circle", "--out", "/no/such/folder/x.png"], "does not exist");
}

#[test]
fn train_rejects_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    fails_with(&["train", "--run-dir", run, "--samples-per-epoch", "0"], "--samples-per-epoch must be at least 1");
    fails_with(&["train", "--run-dir", run, "--lr=-0.1"], "--lr must be a positive number");
    fails_with(&["train", "--run-dir", run, "--train-batch-size", "64", "--samples-per-epoch", "32"], "larger than --samples-per-epoch");
    fails_with(&["train", "--run-dir", run, "--model", "/no/such/model.safetensors"], "not found");
    fails_with(&["train", "--run-dir", run, "--reward", "beauty"], "unknown reward");
    fails_with(&["train", "--resume", "/no/such/run"], "not a run folder");
}
