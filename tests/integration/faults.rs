//! The run folder under faults, through the binary: a second process on a live run is refused
//! with the holder's pid, a kill -9 leaves no stale lock and resumes to the uninterrupted run, a
//! damaged latest checkpoint falls back to the previous one, a torn metrics line is dropped, and
//! a failed checkpoint write (a full disk) is one clean error that leaves the last good
//! checkpoint loadable.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{metrics, save_tiny_policy};

fn ddpo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "ddpo {args:?} panicked: {stderr}");
    (out.status.success(), stderr)
}

/// `ddpo train` on the tiny model with the built-in brightness reward, small epochs.
fn train_args(model: &Path, run: &Path, epochs: usize) -> Vec<String> {
    let epochs = epochs.to_string();
    [
        "train", "--model", model.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--reward", "brightness",
        "--epochs", &epochs, "--checkpoint-every", "1", "--samples-per-epoch", "4", "--sample-batch-size", "2",
        "--train-batch-size", "2", "--steps", "3", "--seed", "4",
    ]
    .map(String::from)
    .to_vec()
}

/// Trains `epochs` epochs into `run` and checks that it succeeded.
fn train(model: &Path, run: &Path, epochs: usize) {
    let (ok, stderr) = ddpo(&train_args(model, run, epochs).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{stderr}");
}

/// The tiny model saved in `dir`, and an uninterrupted run of `epochs` epochs on it.
fn straight_run(dir: &Path, epochs: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = save_tiny_policy(dir);
    let straight = dir.join("straight");
    train(&model, &straight, epochs);
    (model, straight)
}

fn wait_for(mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_live_run_is_locked_and_a_killed_one_resumes_to_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let (model, straight) = straight_run(dir.path(), 6);

    // A run long enough to be alive when a second process comes: refused, naming its pid.
    let long = dir.path().join("long");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpo")).args(train_args(&model, &long, 10_000)).stderr(Stdio::null()).spawn().unwrap();
    wait_for(|| metrics_lines(&long) >= 1);
    let (ok, stderr) = ddpo(&["train", "--resume", long.to_str().unwrap()]);
    assert!(!ok && stderr.contains("in use by process") && stderr.contains(&child.id().to_string()), "{stderr}");
    // kill -9: the lock dies with the process.
    child.kill().unwrap();
    child.wait().unwrap();
    let (ok, stderr) = ddpo(&["train", "--resume", long.to_str().unwrap(), "--epochs", "1"]);
    assert!(ok && !stderr.contains("in use"), "{stderr}");

    // Killed mid-run, resumed: the uninterrupted run's metrics.
    let run = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpo")).args(train_args(&model, &run, 6)).stderr(Stdio::null()).spawn().unwrap();
    wait_for(|| metrics_lines(&run) >= 2);
    child.kill().unwrap();
    child.wait().unwrap();
    let (ok, stderr) = ddpo(&["train", "--resume", run.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(metrics(&straight), metrics(&run));
}

#[test]
fn a_torn_metrics_line_is_dropped_on_resume_and_a_damaged_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (model, straight) = straight_run(dir.path(), 3);
    let run = dir.path().join("run");
    train(&model, &run, 2);
    // A kill in the middle of appending epoch 2's record leaves the start of a line, no newline.
    let path = run.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"epoch\":2,\"");
    std::fs::write(&path, &text).unwrap();
    let (ok, stderr) = ddpo(&["train", "--resume", run.to_str().unwrap(), "--epochs", "3"]);
    assert!(ok, "{stderr}");
    assert_eq!(metrics(&straight), metrics(&run));

    // A line in the middle that does not parse is damage, not a torn append: named, not skipped.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[1] = "{\"epoch\": 1, garbage";
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let (ok, stderr) = ddpo(&["train", "--resume", run.to_str().unwrap(), "--epochs", "4"]);
    assert!(!ok && stderr.contains("metrics.jsonl line 2 is corrupt"), "{stderr}");
}

fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

#[test]
fn a_damaged_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let (model, straight) = straight_run(dir.path(), 4);
    let run = dir.path().join("run");
    train(&model, &run, 3);
    // Truncate the latest checkpoint's weights, as a crash of the disk under it would.
    let latest = run.join("checkpoint/policy.safetensors");
    let bytes = std::fs::read(&latest).unwrap();
    std::fs::write(&latest, &bytes[..bytes.len() / 3]).unwrap();
    let (ok, stderr) = ddpo(&["train", "--resume", run.to_str().unwrap(), "--epochs", "4"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("the latest checkpoint is unreadable") && stderr.contains("resuming from the previous one, epoch 2"), "{stderr}");
    // Epoch 2 was replayed from the previous checkpoint: the run is the uninterrupted one.
    assert_eq!(metrics(&straight), metrics(&run));
}

/// A small tmpfs mounted at `dir` (root only), unmounted on drop; `None` where mounting is not
/// permitted.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir.to_str().unwrap()]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_failed_checkpoint_write_is_one_clean_error_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = save_tiny_policy(dir.path());
    let disk = dir.path().join("disk");
    let run = disk.join("run");
    // A real full disk where the machine allows mounting a tmpfs; else a write that fails the
    // same way (the checkpoint's staging folder is taken by a file).
    let tmpfs = Tmpfs::mount(&disk, "16m");
    train(&model, &run, 1);
    let good = std::fs::read(run.join("checkpoint/policy.safetensors")).unwrap();
    match &tmpfs {
        Some(_) => fill(&disk.join("filler")),
        None => std::fs::write(run.join("checkpoint.new"), b"in the way").unwrap(),
    }
    let (ok, stderr) = ddpo(&["train", "--resume", run.to_str().unwrap(), "--epochs", "2"]);
    assert!(!ok, "{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default();
    match tmpfs {
        // Whichever write meets the full disk first: its cause, once, and what to do.
        Some(_) => assert!(error.matches("No space left on device").count() == 1 && error.contains("free some space"), "{stderr}"),
        None => assert!(error.contains("checkpoint not written") && error.contains("--resume"), "{stderr}"),
    }
    assert_eq!(good, std::fs::read(run.join("checkpoint/policy.safetensors")).unwrap());
    ddpo::family::Policy::load(&run.join("checkpoint/policy.safetensors"), &candle_core::Device::Cpu).unwrap();
}

/// Writes to `path` until the disk is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
}
