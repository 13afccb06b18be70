//! `ddpo experiment`: bad scripts fail at load with `file:line:col` before any run starts, and an
//! experiment killed with kill -9 and run again finishes with the same table as an
//! uninterrupted one.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::save_tiny_policy;

fn ddpo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "ddpo {args:?} panicked: {stderr}");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

/// A two-run experiment (IS and SF, one seed) on the tiny model, small epochs, a paired eval.
fn tiny_experiment(dir: &Path) -> std::path::PathBuf {
    let model = save_tiny_policy(dir);
    let script = format!(
        r#"let e = experiment("tiny");
e.set("model", "{}");
e.set("reward", "brightness");
e.set("epochs", 3);
e.set("checkpoint-every", 1);
e.set("samples-per-epoch", 4);
e.set("sample-batch-size", 2);
e.set("train-batch-size", 2);
e.set("steps", 3);
e.vary("algo", ["is", "sf"]);
e.seeds([4]);
e.paired_eval(2, 2);
e
"#,
        // relative to the script's folder, as a shared experiment names its model
        model.file_name().unwrap().to_string_lossy()
    );
    let path = dir.join("tiny.rhai");
    std::fs::write(&path, script).unwrap();
    path
}

/// results.md without the wall-time section (this machine's clock).
fn table(root: &Path) -> String {
    let text = std::fs::read_to_string(root.join("tiny/results.md")).unwrap();
    text.split("\nWall time").next().unwrap().to_string()
}

#[test]
fn a_killed_experiment_continues_to_the_same_table() {
    let dir = tempfile::tempdir().unwrap();
    let script = tiny_experiment(dir.path());
    let (straight, killed) = (dir.path().join("straight"), dir.path().join("killed"));
    let (ok, stdout, stderr) = ddpo(&["experiment", script.to_str().unwrap(), "--root", straight.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| `is` | 1/1 |") && stdout.contains("| `sf` | 1/1 |"), "{stdout}");
    assert!(straight.join("tiny/results.png").exists());
    let records = std::fs::read_to_string(straight.join("tiny/algo-sf.seed-4/metrics.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 3);

    // Killed in its second run, after an epoch of it, then run again.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddpo"))
        .args(["experiment", script.to_str().unwrap(), "--root", killed.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let second = killed.join("tiny/algo-sf.seed-4/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&second).map_or(0, |t| t.lines().count()) < 1 {
        assert!(start.elapsed() < Duration::from_secs(300), "timed out");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("tiny/algo-sf.seed-4/experiment.json").exists(), "killed before the second run finished");
    let (ok, _, stderr) = ddpo(&["experiment", script.to_str().unwrap(), "--root", killed.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("algo-is.seed-4: finished, skipped") && stderr.contains("algo-sf.seed-4: resuming"), "{stderr}");
    assert_eq!(table(&straight), table(&killed));
    // --report alone rewrites the same table from the folders.
    let (ok, _, stderr) = ddpo(&["experiment", script.to_str().unwrap(), "--root", killed.to_str().unwrap(), "--report"]);
    assert!(ok && !stderr.contains("resuming"), "{stderr}");
    assert_eq!(table(&straight), table(&killed));
}

#[test]
fn bad_experiments_fail_at_load_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("experiments");
    let fails = |body: &str, needle: &str| {
        let path = dir.path().join("bad.rhai");
        std::fs::write(&path, format!("let e = experiment(\"bad\");\n{body}\ne\n")).unwrap();
        let (ok, _, stderr) = ddpo(&["experiment", path.to_str().unwrap(), "--root", root.to_str().unwrap()]);
        assert!(!ok && stderr.contains(needle), "{body}: wanted {needle:?} in {stderr}");
        assert!(!root.exists(), "nothing ran");
    };
    fails("e.set(\"epochs\", 2);\ne.set(\"learning-rate\", 1e-3);", "bad.rhai:3:");
    fails("e.set(\"learning-rate\", 1e-3);", "unexpected argument '--learning-rate'");
    fails("e.vary(\"algo\", []);", "bad.rhai:2:");
    fails("e.vary(\"algo\", []);", "the axis algo has no values");
    fails("e.vary(\"reward\", [\"compressibility\", \"missing.rhai\"]);", "no such script");
    fails("e.set(\"model\", \"missing.safetensors\");", "no such model");
    fails("e.vary(\"algo\", [\"is\", \"ppo\"]);", "invalid value 'ppo'");
    fails("e.set(\"run-dir\", \"x\");", "run-dir is set by the experiment");
    fails("e.set(\"same-noise\", 3);", "is a switch");
    fails("e.set(\"epochs\", 2);\ne.set(\"epochs\", 3);", "epochs is declared twice");
    // A combination only the whole run's settings refuse, still before any run.
    fails("e.set(\"group-size\", 3);", "--samples-per-epoch 32 is not a multiple of --group-size 3");
}

/// The shipped experiments load, and every run's settings build (`--plan`), from any folder.
#[test]
fn shipped_experiments_plan() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/experiments");
    let root = tempfile::tempdir().unwrap();
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let (ok, stdout, stderr) = ddpo(&["experiment", path.to_str().unwrap(), "--plan", "--root", root.path().to_str().unwrap()]);
        assert!(ok && stdout.lines().all(|l| l.starts_with("new ")), "{}: {stderr}{stdout}", path.display());
        count += 1;
    }
    assert!(count >= 4);
}
