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
    let config = serde_json::to_string(&ddpo::family::PolicyConfig::tiny_test()).unwrap();
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
    fails_with(&["train", "--run-dir", run, "--steps", "2"], "leaves none of the 2 sampling steps to train on");
    assert!(!dir.path().join("run").exists(), "a failed start left a run folder behind");
    fails_with(&["train", "--run-dir", run, "--stat-min-count", "1"], "--stat-min-count must be at least 2");
}

/// A tiny random policy saved in `dir`, with its config beside it.
fn tiny_model(dir: &std::path::Path) -> String {
    let model = dir.join("tiny.safetensors");
    ddpo::family::Policy::new_random(ddpo::family::PolicyConfig::tiny_test(), 0, &candle_core::Device::Cpu).unwrap().save(&model).unwrap();
    model.to_str().unwrap().to_string()
}

#[test]
fn eval_scores_given_prompts_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let grid = dir.path().join("grid.png");
    let prompts = ["a red circle on a blue background", "two green squares on a white and black background"];
    let out = Command::new(env!("CARGO_BIN_EXE_ddpo"))
        .args(["eval", "--model", &model, "--steps", "2", "--per-prompt", "3", "--grid", grid.to_str().unwrap()])
        .args(prompts.iter().flat_map(|p| ["--prompt", p]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["samples"], 6);
    let lines = report["per_prompt"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    for (line, prompt) in lines.iter().zip(prompts) {
        assert_eq!(line["prompt"], prompt);
        assert_eq!(line["samples"], 3);
        let alignment = line["alignment"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&alignment), "cosine similarity out of range: {alignment}");
        assert!(line["jpeg_kb"].as_f64().unwrap() > 0.3, "{line}");
        assert!(line["aesthetic"].as_f64().unwrap().is_finite(), "{line}");
    }
    // The whole set's means are the per-prompt means averaged (equal counts).
    let mean_kb = lines.iter().map(|l| l["jpeg_kb"].as_f64().unwrap()).sum::<f64>() / 2.0;
    assert!((report["jpeg_kb"].as_f64().unwrap() - mean_kb).abs() < 1e-9);
    let grid = image::open(&grid).unwrap();
    assert!(grid.width() >= 3 * 16 && grid.height() >= 2 * 16);
    fails_with(&["eval", "--model", &model, "--prompt", "a red blob"], "not a shapes-world caption");
}

#[test]
fn eval_reward_reports_its_agreement_with_the_judge() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let eval = |reward: &str| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_ddpo"))
            .args(["eval", "--model", &model, "--steps", "2", "-n", "8", "--reward", reward])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // A built-in reward: compressibility is minus the JPEG size.
    let report = eval("compressibility");
    assert!((report["reward"].as_f64().unwrap() + report["jpeg_kb"].as_f64().unwrap()).abs() < 1e-9, "{report}");
    // The judge as a script reward agrees with the judge perfectly.
    let script = dir.path().join("judge.rhai");
    std::fs::write(&script, "fn reward(img, prompt, meta) { judge(img, prompt).both }\n").unwrap();
    let report = eval(script.to_str().unwrap());
    assert!((report["reward"].as_f64().unwrap() - report["both"].as_f64().unwrap()).abs() < 1e-9, "{report}");
    match report["reward_auc"].as_f64() {
        Some(auc) => assert_eq!(auc, 1.0, "{report}"),
        None => assert!(report["both"] == 0.0 || report["both"] == 1.0, "{report}"),
    }
}

#[test]
fn train_clip_sample_flag_reaches_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let run = dir.path().join("run");
    let (ok, stderr) = ddpo(&[
        "train", "--model", &model, "--run-dir", run.to_str().unwrap(), "--reward", "brightness", "--epochs", "1",
        "--samples-per-epoch", "2", "--sample-batch-size", "2", "--train-batch-size", "2", "--steps", "3", "--clip-sample", "true",
    ]);
    assert!(ok, "{stderr}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["clip_sample"], true);
    let saved = std::fs::read_to_string(run.join("checkpoint/policy.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(saved["scheduler"]["clip_sample"], true, "the tiny model has it off; the run turned it on");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(m["rss_mb"].as_f64().unwrap() > 1.0 && m["peak_rss_mb"].as_f64().unwrap() >= m["rss_mb"].as_f64().unwrap());
}

#[test]
fn resume_with_epochs_extends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    let common = ["--samples-per-epoch", "2", "--sample-batch-size", "2", "--train-batch-size", "2", "--steps", "3"];
    let mut args = vec!["train", "--model", &model, "--run-dir", run, "--reward", "brightness", "--epochs", "1"];
    args.extend(common);
    let (ok, stderr) = ddpo(&args);
    assert!(ok, "{stderr}");
    let (ok, stderr) = ddpo(&["train", "--resume", run, "--epochs", "2"]);
    assert!(ok, "{stderr}");
    let metrics = std::fs::read_to_string(std::path::Path::new(run).join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(std::path::Path::new(run).join("config.json")).unwrap()).unwrap();
    assert_eq!(config["epochs"], 2);
}

/// Numbers that look like flags reach validation and get its reason; `--lora-rank 0` is refused;
/// a library error under RUST_BACKTRACE=1 is its cause chain, with no backtrace (only --debug
/// asks for one).
#[test]
fn bad_numbers_get_reasons_and_errors_stay_short() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    fails_with(&["train", "--run-dir", run, "--lr", "-1"], "--lr must be a positive number, got -1");
    fails_with(&["train", "--run-dir", run, "--guidance", "-1"], "--guidance must be a finite number >= 0, got -1");
    fails_with(&["train", "--run-dir", run, "--kl-weight", "-0.5"], "--kl-weight must be a non-negative number, got -0.5");
    fails_with(&["train", "--run-dir", run, "--lora-rank", "0"], "--lora-rank must be at least 1");
    // Weights that do not fit their config: candle's shape error, which carries a backtrace.
    let model = tiny_model(dir.path());
    let mut config = ddpo::family::PolicyConfig::tiny_test();
    config.unet.block_out_channels = vec![16, 48];
    std::fs::write(dir.path().join("tiny.json"), serde_json::to_string(&config).unwrap()).unwrap();
    let out = dir.path().join("x.png");
    let mut args = vec!["sample", "--prompt", "a red circle", "--out", out.to_str().unwrap(), "--model", &model];
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ddpo")).args(args).env("RUST_BACKTRACE", "1").output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = run(&args);
    assert!(stderr.contains("does not match its config") && stderr.trim().lines().count() == 1, "{stderr}");
    args.push("--debug");
    assert!(run(&args).lines().count() > 5, "--debug shows the backtrace");
}

/// `--eval-every`: the gold score on held-out suite prompts, their diversity and range land in
/// metrics.jsonl at the epochs due, and `--keep-best` keeps the best checkpoint.
#[test]
fn train_evaluates_a_gold_score_and_keeps_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let run = dir.path().join("run");
    let (ok, stderr) = ddpo(&[
        "train", "--model", &model, "--run-dir", run.to_str().unwrap(), "--reward", "brightness", "--epochs", "2",
        "--samples-per-epoch", "4", "--sample-batch-size", "4", "--train-batch-size", "4", "--steps", "3",
        "--eval-every", "1", "--eval-prompts", "2", "--eval-per-prompt", "2", "--keep-best",
    ]);
    assert!(ok, "{stderr}");
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for r in &records {
        for key in ["eval/suite_strict", "eval/suite_partial", "eval/diversity", "eval/out_of_range"] {
            let v = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {r}"));
            assert!((0.0..=1.0).contains(&v), "{key} {v}");
        }
        assert!(r["eval/diversity"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(stderr.contains("is the best so far") && run.join("best/policy.safetensors").exists(), "{stderr}");
    // The baseline: the same evaluation of the model before its first update, once.
    let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("gold-base.json")).unwrap()).unwrap();
    assert!((0.0..=1.0).contains(&base["eval/gold"].as_f64().unwrap()) && base["eval/diversity"].as_f64().unwrap() > 0.0, "{base}");
    assert_eq!(stderr.matches("gold before training").count(), 1, "{stderr}");
    // Each later evaluation is paired with it: the strict score's change and its interval.
    assert_eq!(base["eval/passes"].as_array().map(Vec::len), Some(2), "passes per prompt: {base}");
    let change_of = |r: &serde_json::Value| ["eval/strict_change_low", "eval/strict_change", "eval/strict_change_high"].map(|k| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}")));
    for r in &records {
        let [low, change, high] = change_of(r);
        assert!((-1.0..=1.0).contains(&change) && low <= change && change <= high, "{r}");
    }
    assert!(stderr.lines().filter(|l| l.starts_with("epoch")).all(|l| l.contains("(strict ")), "{stderr}");
    let (ok, stderr) = ddpo(&["train", "--resume", run.to_str().unwrap(), "--epochs", "3"]);
    assert!(ok && !stderr.contains("gold before training"), "evaluated once per run: {stderr}");
    let last: serde_json::Value = serde_json::from_str(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().last().unwrap()).unwrap();
    change_of(&last);
    fails_with(&["train", "--run-dir", dir.path().join("r2").to_str().unwrap(), "--eval-every", "1", "--eval-per-prompt", "1"], "--eval-per-prompt must be at least 2");
}

/// `--eval-reward`: a script's mean on the held-out samples is the gold score the monitor
/// watches (`eval/gold` = `eval/reward`), the suite's figures still logged, and `reward.png`
/// gains its panels; the script is checked before the run starts.
#[test]
fn a_gold_reward_script_replaces_the_suite_score() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let gold = dir.path().join("gold.rhai");
    std::fs::write(&gold, "fn reward(img, prompt, meta) { 10.0 + img.brightness() }\n").unwrap();
    let run = dir.path().join("run");
    let (ok, stderr) = ddpo(&[
        "train", "--model", &model, "--run-dir", run.to_str().unwrap(), "--reward", "brightness", "--epochs", "2",
        "--samples-per-epoch", "4", "--sample-batch-size", "4", "--train-batch-size", "4", "--steps", "3",
        "--eval-every", "2", "--eval-prompts", "2", "--eval-per-prompt", "2", "--eval-reward", gold.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(records[0].get("eval/gold").is_none(), "no evaluation after epoch 0 with --eval-every 2");
    let (gold_value, reward) = (records[1]["eval/gold"].as_f64().unwrap(), records[1]["eval/reward"].as_f64().unwrap());
    assert!(gold_value == reward && (10.0..=11.0).contains(&reward), "{}", records[1]);
    // The epoch line says what the evaluation found, only where there was one.
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("epoch")).collect();
    assert!(!lines[0].contains("| gold") && lines[1].contains(&format!("| gold {gold_value:.3} (strict ")), "{stderr}");
    assert!(records[1]["eval/suite_strict"].is_number());
    let plot = image::open(run.join("reward.png")).unwrap();
    assert_eq!(plot.height(), 3 * 260, "reward, gold reward and evaluation panels");
    std::fs::write(&gold, "fn reward(img, prompt, meta) { img.nope() }\n").unwrap();
    let (ok, stderr) = ddpo(&[
        "train", "--model", &model, "--run-dir", dir.path().join("r2").to_str().unwrap(), "--epochs", "1", "--steps", "3",
        "--eval-every", "1", "--eval-reward", gold.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("gold.rhai:1:") && stderr.contains("the gold reward"), "{stderr}");
}

/// A run that wrecks the model: the shipped default at a learning rate far too high. After its
/// first two epochs the suite's strict score has been below its value before training beyond
/// its interval twice in a row, whatever the reward did: the monitor says so and
/// `--stop-on-hack` stops there. A run whose updates change nothing (lr 1e-12) is not flagged.
#[test]
fn a_run_that_wrecks_the_model_is_told_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shapes-unet.safetensors");
    let train = |lr: &str, run: &str, epochs: &str| {
        ddpo(&[
            "train", "--model", model, "--run-dir", dir.path().join(run).to_str().unwrap(), "--reward", "brightness", "--epochs", epochs,
            "--samples-per-epoch", "8", "--sample-batch-size", "8", "--train-batch-size", "8", "--steps", "4", "--warmup-steps", "0",
            "--lr", lr, "--eval-every", "1", "--eval-prompts", "12", "--eval-per-prompt", "2", "--stop-on-hack",
        ])
    };
    let (ok, stderr) = train("1e-2", "wrecked", "3");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("the model is losing what the gold score measures") && stderr.contains("two evaluations in a row"), "{stderr}");
    assert!(stderr.contains("stopped after epoch 1: the suite's score fell beyond its noise (--stop-on-hack)"), "{stderr}");
    let records = std::fs::read_to_string(dir.path().join("wrecked/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(records.lines().last().unwrap()).unwrap();
    assert!(records.lines().count() == 2 && last["eval/strict_change_high"].as_f64().unwrap() < 0.0, "{records}");
    let (ok, stderr) = train("1e-12", "unchanged", "2");
    assert!(ok && !stderr.contains("losing what the gold score") && stderr.contains("done:"), "{stderr}");
}
