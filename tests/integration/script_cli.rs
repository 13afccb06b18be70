//! Scripts through the binary: `ddpo check` output and exit codes, and `ddpo train` with reward,
//! prompt and hooks scripts (versions kept, hot reload while it runs, waiting for a fix, hook
//! overrides and early stop, the `scripts/` folder as the default).

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::fixtures::{quiet, write};
use ddpo::script::{Limits, ScriptSet};

fn ddpo(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "ddpo {args:?} panicked: {stderr}");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

#[test]
fn cli_check_prints_ok_or_positioned_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reward.rhai");
    let bad = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  img.jpeg_size(95) +\n}\n");
    let (ok, stdout, _) = ddpo(&["check", good.to_str().unwrap()]);
    assert!(ok && stdout.contains("reward.rhai: ok"), "{stdout}");
    let (ok, stdout, stderr) = ddpo(&["check", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains(&format!("{}:3:1: ", bad.display())), "{stdout}");
    assert!(stderr.contains("1 of 2 scripts failed"), "{stderr}");
    // A near miss of an entry point fails the check too.
    let near = write(dir.path(), "x.rhai", "\n\nfn rewrd(img, prompt, meta) { 1.0 }\n");
    let (ok, stdout, stderr) = ddpo(&["check", near.to_str().unwrap()]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains(&format!("{}:3:1: fn rewrd(img, prompt, meta) looks like a misspelt fn reward(img, prompt, meta)", near.display())), "{stdout}");
    assert!(stderr.contains("1 of 1 scripts failed"), "{stderr}");
}

#[test]
fn cli_train_runs_scripts_and_keeps_their_versions() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.safetensors");
    ddpo::family::Policy::new_random(ddpo::family::PolicyConfig::tiny_test(), 0, &candle_core::Device::Cpu).unwrap().save(&model).unwrap();
    let reward = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  print(`epoch ${context().epoch}`);\n  #{ total: -img.jpeg_size(95), bright: img.brightness() }\n}\n");
    let prompts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prompts.rhai");
    let run = dir.path().join("run");
    let common = ["--model", model.to_str().unwrap(), "--epochs", "2", "--samples-per-epoch", "4", "--sample-batch-size", "2", "--train-batch-size", "2", "--steps", "3"];
    let mut args = vec!["train", "--run-dir", run.to_str().unwrap(), "--reward", reward.to_str().unwrap(), "--prompts", prompts.to_str().unwrap()];
    args.extend(common);
    let (ok, _, stderr) = ddpo(&args);
    assert!(ok, "{stderr}");
    let hash = ScriptSet::new(Limits::default(), quiet()).load_reward(&reward).unwrap().hash();
    assert!(stderr.contains(&format!("reward.rhai@{}", &hash[..8])), "{stderr}");
    assert!(stderr.contains("[reward.rhai] epoch 1"), "{stderr}");
    assert!(run.join(format!("scripts/reward.{hash}.rhai")).exists());
    let epochs = std::fs::read_to_string(run.join("scripts/epochs.jsonl")).unwrap();
    assert_eq!(epochs.lines().count(), 2, "{epochs}");
    assert!(epochs.lines().all(|l| l.contains(&hash) && l.contains("prompts.rhai")), "{epochs}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("bright"), "{metrics}");
    assert!(metrics.lines().all(|l| l.contains(&format!("\"reward.rhai\":\"{hash}\""))), "{metrics}");

    // A broken script stops `train` before any work, with its position.
    let bad = write(dir.path(), "bad.rhai", "fn reward(img, prompt, meta) {\n  1 +\n}\n");
    let run2 = dir.path().join("run2");
    let mut args = vec!["train", "--run-dir", run2.to_str().unwrap(), "--reward", bad.to_str().unwrap()];
    args.extend(common);
    let (ok, _, stderr) = ddpo(&args);
    assert!(!ok && stderr.contains("bad.rhai:3:1: "), "{stderr}");
}

/// `ddpo train` on a tiny random policy with the scripts in `scripts/` (a temp copy), stderr
/// streamed line by line.
struct LiveTrain {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl LiveTrain {
    fn start(dir: &Path, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let model = dir.join("tiny.safetensors");
        ddpo::family::Policy::new_random(ddpo::family::PolicyConfig::tiny_test(), 0, &candle_core::Device::Cpu).unwrap().save(&model).unwrap();
        let scripts = dir.join("scripts");
        let mut args: Vec<String> = ["train", "--model", model.to_str().unwrap(), "--run-dir", dir.join("run").to_str().unwrap()]
            .map(String::from)
            .to_vec();
        args.extend(["--reward", scripts.join("reward.rhai").to_str().unwrap(), "--prompts", scripts.join("prompts.rhai").to_str().unwrap()].map(String::from));
        args.extend(["--samples-per-epoch", "4", "--sample-batch-size", "2", "--train-batch-size", "2", "--steps", "3", "--checkpoint-every", "1000"].map(String::from));
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ddpo"))
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Reads stderr until a line contains `needle`; returns that line.
    fn until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    assert!(!line.contains("panicked"), "{line}");
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} within 60 s; stderr so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The reward printed on the next epoch line.
    fn next_epoch_reward(&mut self) -> f64 {
        let line = self.until("epoch ");
        let r = line.split("reward ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap_or_else(|| panic!("{line}"));
        r.parse().unwrap_or_else(|_| panic!("{line}"))
    }
}

impl Drop for LiveTrain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the shipped scripts folder with `reward.rhai` replaced.
fn scripts_copy(dir: &Path, reward: &str) -> PathBuf {
    let scripts = dir.join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    for e in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, scripts.join(p.file_name().unwrap())).unwrap();
        }
    }
    write(&scripts, "reward.rhai", reward)
}

/// Saves `text` as an editor does, atomically: a running `train` polling the file must never see
/// it truncated (an empty script fails its reload and would be reported as a "kept" version).
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("rhai.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Compiles and passes the dry run (32x32 shapes-world images) but throws on the tiny policy's
/// 16x16 samples: a runtime failure mid-run.
const THROWS_ON_SMALL: &str = "fn reward(img, prompt, meta) {\n  if img.width < 32 { throw `too small: ${img.width}` }\n  3.0\n}\n";

#[test]
fn cli_train_hot_reloads_keeps_old_on_errors_and_waits_for_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let reward = scripts_copy(dir.path(), "fn reward(img, prompt, meta) { 1.0 }\n");
    let mut run = LiveTrain::start(dir.path(), &["--epochs", "200"]);
    assert_eq!(run.next_epoch_reward(), 1.0);

    // An edit is picked up at the next epoch boundary: every epoch after the reload scores 2.
    save(&reward, "fn reward(img, prompt, meta) { 2.0 }\n");
    run.until("reloaded reward.rhai (");
    assert_eq!(run.next_epoch_reward(), 2.0);

    // A syntax error is reported with its position and the run goes on with the old version.
    save(&reward, "fn reward(img, prompt, meta) {\n  3.0 *\n}\n");
    let kept = run.until("kept reward.rhai");
    assert!(kept.contains(&format!("{}:3:1: ", reward.display())), "{kept}");
    assert_eq!(run.next_epoch_reward(), 2.0);
    assert_eq!(run.next_epoch_reward(), 2.0);

    // A version that throws on the real samples aborts its epoch (no update) and the run waits.
    save(&reward, THROWS_ON_SMALL);
    run.until("reloaded reward.rhai (");
    let aborted = run.until("aborted, the model is untouched");
    assert!(aborted.contains("reward.rhai:2:") && aborted.contains("too small: 16") && aborted.contains("sample 0"), "{aborted}");
    run.until("waiting for a fixed script");

    // The fix is picked up and training goes on.
    save(&reward, "fn reward(img, prompt, meta) { 4.0 }\n");
    run.until("reloaded reward.rhai (");
    assert_eq!(run.next_epoch_reward(), 4.0);
    drop(run);

    // metrics.jsonl: consecutive epochs (the aborted one left no record), rewards 1 -> 2 -> 4,
    // each epoch naming the hash of a version kept in the run folder.
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let rewards: Vec<f64> = records.iter().map(|r| r["reward_mean"].as_f64().unwrap()).collect();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["epoch"].as_u64(), Some(i as u64), "{metrics}");
        let hash = r["scripts"]["reward.rhai"].as_str().unwrap();
        assert!(dir.path().join(format!("run/scripts/reward.{hash}.rhai")).exists(), "{hash}");
    }
    assert!(rewards.windows(2).all(|w| w[0] <= w[1]) && rewards.iter().all(|r| [1.0, 2.0, 4.0].contains(r)), "{rewards:?}");
    assert!(rewards.contains(&2.0) && rewards.last() == Some(&4.0), "{rewards:?}");
}

#[test]
fn cli_train_on_error_exit_checkpoints_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    scripts_copy(dir.path(), THROWS_ON_SMALL);
    let mut run = LiveTrain::start(dir.path(), &["--epochs", "3", "--on-error", "exit"]);
    let status = run.child.wait().unwrap();
    // Until the reader thread sees the pipe close.
    let stderr: Vec<String> = std::iter::from_fn(|| run.lines.recv_timeout(Duration::from_secs(30)).ok()).collect();
    let stderr = stderr.join("\n");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("epoch 0 aborted") && stderr.contains("too small: 16"), "{stderr}");
    assert!(stderr.contains("--resume") && !stderr.contains("panicked"), "{stderr}");
    assert!(dir.path().join("run/checkpoint/state.json").exists(), "the run is checkpointed");
}

/// A tiny random policy saved in `dir`, and the flags of a small, fast `ddpo train`.
fn tiny_train_args(dir: &Path) -> Vec<String> {
    let model = dir.join("tiny.safetensors");
    ddpo::family::Policy::new_random(ddpo::family::PolicyConfig::tiny_test(), 0, &candle_core::Device::Cpu).unwrap().save(&model).unwrap();
    ["--model", model.to_str().unwrap(), "--samples-per-epoch", "4", "--sample-batch-size", "2", "--train-batch-size", "2", "--steps", "3"]
        .map(String::from)
        .to_vec()
}

const HOOKED_REWARD: &str = "fn reward(img, prompt, meta) {\n  #{ total: 100.0, listed: if prompt == \"a green star on a red background\" { 1.0 } else { 0.0 }, one: 1.0, two: 2.0 }\n}\n";

const HOOKS: &str = r#"fn on_epoch_start(ctx) {
  print(`start ${ctx.epoch} step ${ctx.step} g ${ctx.guidance} w ${ctx.weights.len()}`);
  if ctx.epoch == 0 { return #{ lr: 0.001, guidance: 2.5 }; }
  if ctx.epoch == 1 { return #{ weights: #{ one: 3.0, two: 0.5 }, prompts: ["a green star on a red background"] }; }
  if ctx.epoch == 2 { return #{ weights: #{ three: 1.0 } }; }
}
fn on_epoch_end(ctx) {
  print(`end ${ctx.epoch} mean ${ctx.metrics.reward_mean} of ${ctx.reward_mean.len()}`);
  if ctx.epoch == 3 { #{ stop: true } }
}
"#;

/// `ddpo train` of the tiny model with `reward` and `hooks` into `run`: its metrics records and
/// stderr.
fn train_with_hooks(dir: &Path, run: &Path, reward: &str, hooks: &Path, epochs: usize) -> (Vec<serde_json::Value>, String) {
    let epochs = epochs.to_string();
    let mut args: Vec<String> = ["train", "--run-dir", run.to_str().unwrap(), "--reward", reward, "--hooks", hooks.to_str().unwrap(), "--epochs", &epochs]
        .map(String::from)
        .to_vec();
    args.extend(tiny_train_args(dir));
    let (ok, _, stderr) = ddpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    (text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(), stderr)
}

#[test]
fn cli_train_applies_hook_overrides_and_stops_early() {
    let dir = tempfile::tempdir().unwrap();
    let reward = write(dir.path(), "reward.rhai", HOOKED_REWARD);
    let hooks = write(dir.path(), "hooks.rhai", HOOKS);
    let run = dir.path().join("run");
    let (records, stderr) = train_with_hooks(dir.path(), &run, reward.to_str().unwrap(), &hooks, 10);
    // on_epoch_end stopped the run after epoch 3.
    assert_eq!(records.len(), 4, "{stderr}");
    assert!(stderr.contains("stopped by the hooks after epoch 3"), "{stderr}");
    assert!(run.join("checkpoint/state.json").exists());
    // Epoch 0: lr and guidance overridden; the script's own total counts.
    assert_eq!(records[0]["hooks"], serde_json::json!({ "lr": 0.001, "guidance": 2.5 }));
    assert_eq!(records[0]["reward_mean"], 100.0);
    assert!(stderr.contains("hooks: lr=1.000e-3 guidance=2.5"), "{stderr}");
    assert!(stderr.contains(&format!("[hooks.rhai] start 1 step {} g 2.5 w 0", records[0]["optimizer_steps"])), "{stderr}");
    // Epoch 1: total = 3 * one + 0.5 * two, prompts all from the hook's list; the lr stays.
    assert_eq!(records[1]["reward_mean"], 4.0);
    assert_eq!(records[1]["reward/listed"], 1.0);
    assert_eq!(records[1]["weights"], serde_json::json!({ "one": 3.0, "two": 0.5 }));
    assert_eq!(records[1]["lr"], applied_lr(&records, 1, 0.001));
    // Epoch 2: an unknown component is refused at its key; the previous settings stay.
    let e = records[2]["hooks_error"].as_str().unwrap();
    assert!(e.starts_with(&format!("{}:5:45: ", hooks.display())) && e.contains("`weights` names `three`") && e.contains("one, two"), "{e}");
    assert!(records[2].get("hooks").is_none());
    assert_eq!((records[2]["reward_mean"].as_f64(), records[3]["reward_mean"].as_f64()), (Some(4.0), Some(4.0)));
    assert!((0..4).all(|i| records[i]["lr"] == applied_lr(&records, i, 0.001)));
    assert!(stderr.contains("[hooks.rhai] end 2 mean 4.0 of 3"), "{stderr}");
    // The hooks script is versioned like the others.
    let hash = records[3]["scripts"]["hooks.rhai"].as_str().unwrap();
    assert!(run.join(format!("scripts/hooks.{hash}.rhai")).exists());

    // --resume re-applies the settings the hooks made (lr, weights, prompt list) and goes on.
    let (ok, _, stderr) = ddpo(&["train", "--resume", run.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 10, "{stderr}");
    for (i, r) in records.iter().enumerate().skip(4) {
        let lr = applied_lr(&records, i, 0.001);
        assert_eq!((r["lr"].as_f64(), r["reward_mean"].as_f64(), r["reward/listed"].as_f64()), (Some(lr), Some(4.0), Some(1.0)), "{r}");
    }
}

/// The learning rate the last optimiser step of epoch `i` applied: `lr` ramped up over the
/// default 16 warm-up steps (what `metrics.jsonl` logs).
fn applied_lr(records: &[serde_json::Value], i: usize, lr: f64) -> f64 {
    let steps: u64 = records[..=i].iter().map(|r| r["optimizer_steps"].as_u64().unwrap()).sum();
    lr * ((steps as f64) / 16.0).min(1.0)
}

#[test]
fn cli_train_defaults_to_the_scripts_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = ["train", "--run-dir", "run", "--epochs", "1"].map(String::from).to_vec();
    args.extend(tiny_train_args(dir.path()));
    let train = |cwd: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ddpo")).args(&args).current_dir(cwd).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success() && !stderr.contains("panicked"), "{stderr}");
        stderr
    };
    // A folder without scripts/: the built-ins, with a note.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    let stderr = train(&bare);
    assert!(stderr.contains("note: no scripts/reward.rhai, scripts/prompts.rhai, scripts/hooks.rhai in ")
        && stderr.contains("using the built-in compressibility reward, the built-in prompt list, no hooks"), "{stderr}");
    assert!(stderr.contains("with compressibility"), "{stderr}");
    // A folder with scripts/: all three are used and versioned.
    let project = dir.path().join("project");
    scripts_copy(&project, HOOKED_REWARD);
    write(&project.join("scripts"), "hooks.rhai", "fn on_epoch_start(ctx) { #{ lr: 0.002 } }\n");
    let stderr = train(&project);
    assert!(!stderr.contains("note: no scripts/"), "{stderr}");
    let m: serde_json::Value = serde_json::from_str(std::fs::read_to_string(project.join("run/metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(m["reward_mean"], 100.0);
    assert_eq!(m["lr"], applied_lr(&[m.clone()], 0, 0.002));
    let names: Vec<&String> = m["scripts"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["hooks.rhai", "prompts.rhai", "reward.rhai"]);
}

/// Hook `weights` recombine a built-in reward's components too (compressibility's `jpeg_kb`),
/// and a name it does not return is refused, listing what it returns.
#[test]
fn hook_weights_apply_to_a_builtin_reward() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = write(dir.path(), "hooks.rhai", "fn on_epoch_start(ctx) {\n  if ctx.epoch == 0 { #{ weights: #{ jpeg_kb: -2.0 } } } else { #{ weights: #{ size: 1.0 } } }\n}\n");
    let run = dir.path().join("run");
    let (records, _) = train_with_hooks(dir.path(), &run, "compressibility", &hooks, 2);
    let (mean, kb) = (records[0]["reward_mean"].as_f64().unwrap(), records[0]["reward/jpeg_kb"].as_f64().unwrap());
    assert!((mean - -2.0 * kb).abs() < 1e-9, "reward {mean} vs jpeg_kb {kb}");
    assert_eq!(records[0]["weights"], serde_json::json!({ "jpeg_kb": -2.0 }));
    let e = records[1]["hooks_error"].as_str().unwrap();
    assert!(e.contains("`weights` names `size`") && e.contains("jpeg_kb"), "{e}");
}
