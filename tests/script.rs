//! The Rhai scripting host: rewards equal their Rust counterparts, errors carry `file:line:col`,
//! the sandbox stops runaway scripts and confines `import`, prompt scripts are reproducible per
//! seed, hot reload swaps good versions in and keeps the old one on failure, API.md is current.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ddpo::ddpo::PromptSource;
use ddpo::reward::jpeg::jpeg_kb;
use ddpo::reward::stats::mean_brightness;
use ddpo::reward::Reward;
use ddpo::script::{api, check_file, Context, Limits, Log, ReloadOutcome, ScriptSet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn quiet() -> Log {
    Arc::new(|_: &str| {})
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn world(n: usize) -> (Vec<image::RgbImage>, Vec<String>) {
    ddpo::world::ShapesWorld::default().batch(3, n).into_iter().map(|s| (s.image, s.caption)).unzip()
}

fn load_err(dir: &Path, name: &str, text: &str, limits: Limits) -> String {
    let p = write(dir, name, text);
    match ScriptSet::new(limits, quiet()).load_reward(&p) {
        Ok(_) => panic!("{name} loaded but should fail"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn jpeg_reward_equals_the_rust_computation() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { -img.jpeg_size(95) }\n");
    let reward = ScriptSet::new(Limits::default(), quiet()).load_reward(&p).unwrap();
    assert_eq!(reward.name(), "reward.rhai");
    let (images, prompts) = world(6);
    let scores = reward.score(&images, &prompts).unwrap();
    let builtin = ddpo::reward::JpegCompressibility.score(&images, &prompts).unwrap();
    for ((s, b), img) in scores.iter().zip(&builtin).zip(&images) {
        assert_eq!(s.total, -jpeg_kb(img).unwrap());
        assert_eq!(s.total, b.total);
    }
}

#[test]
fn shipped_default_reward_matches_builtin() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reward.rhai");
    let reward = ScriptSet::new(Limits::default(), quiet()).load_reward(&p).unwrap();
    let (images, prompts) = world(4);
    let a: Vec<f64> = reward.score(&images, &prompts).unwrap().iter().map(|s| s.total).collect();
    let b: Vec<f64> = ddpo::reward::JpegCompressibility.score(&images, &prompts).unwrap().iter().map(|s| s.total).collect();
    assert_eq!(a, b);
}

#[test]
fn map_reward_returns_components() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "reward.rhai",
        "fn reward(img, prompt, meta) {\n  let b = img.brightness();\n  #{ total: 2 * b - 1, bright: b, kb: img.jpeg_size(95), w: img.width }\n}\n",
    );
    let reward = ScriptSet::new(Limits::default(), quiet()).load_reward(&p).unwrap();
    let (images, prompts) = world(3);
    for (s, img) in reward.score(&images, &prompts).unwrap().iter().zip(&images) {
        let b = mean_brightness(img);
        assert_eq!(s.components.keys().collect::<Vec<_>>(), ["bright", "kb", "w"]);
        assert_eq!(s.components["bright"], b);
        assert_eq!(s.components["kb"], jpeg_kb(img).unwrap());
        assert_eq!(s.components["w"], img.width() as f64);
        assert!((s.total - (2.0 * b - 1.0)).abs() < 1e-12);
    }
}

#[test]
fn syntax_error_names_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n    let x = ;\n    x\n}\n", Limits::default());
    let at = format!("{}:2:13: ", dir.path().join("reward.rhai").display());
    assert!(e.starts_with(&at), "{e}");
    assert!(e.contains("Syntax error"), "{e}");
}

#[test]
fn runtime_error_names_position_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  img.pixel(1000, 0)[0]\n}\n", Limits::default());
    assert!(e.contains("reward.rhai:2:"), "{e}");
    assert!(e.contains("outside the 32x32 image") && e.contains("sample 0"), "{e}");
}

#[test]
fn endless_loop_is_stopped_by_the_operation_limit() {
    let dir = tempfile::tempdir().unwrap();
    let endless = "fn reward(img, prompt, meta) {\n  let n = 0;\n  loop { n += 1; }\n}\n";
    // The operation limit alone (a generous deadline).
    let limits = Limits { max_operations: 1_000_000, time_limit: Duration::from_secs(30), ..Limits::default() };
    let e = load_err(dir.path(), "reward.rhai", endless, limits);
    assert!(e.contains("reward.rhai: stopped: ") && e.contains("operation limit of 1000000") && e.contains("sample 0"), "{e}");
    // With the defaults, whichever limit comes first stops it fast, even on a loaded machine.
    let t = Instant::now();
    let e = load_err(dir.path(), "reward.rhai", endless, Limits::default());
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert!(e.contains("reward.rhai: stopped: the script exceeded the "), "{e}");
}

#[test]
fn slow_script_is_stopped_by_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_operations: 0, time_limit: Duration::from_millis(200), ..Limits::default() }; // 0: unlimited
    let t = Instant::now();
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  loop { img.resize(64, 64); }\n}\n", limits);
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert!(e.contains("reward.rhai: stopped: ") && e.contains("time limit of 200 ms"), "{e}");
}

#[test]
fn deep_recursion_and_huge_data_are_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), "reward.rhai", "fn f(n) { f(n + 1) }\nfn reward(img, prompt, meta) { f(0) }\n", Limits::default());
    assert!(e.contains("call depth limit of 32"), "{e}");
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  let s = \"x\";\n  loop { s += s; }\n}\n", Limits::default());
    assert!(e.contains("size limit"), "{e}");
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  let a = [];\n  loop { a.push(img.resize(64, 64)); }\n}\n", Limits { max_image_pixels: 10_000, ..Limits::default() });
    assert!(e.contains("image memory limit of 10000 pixels"), "{e}");
}

#[test]
fn nan_reward_names_prompt_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  if prompt == \"bad one\" { parse_float(\"NaN\") } else { 1.0 }\n}\n");
    let reward = ScriptSet::new(Limits::default(), quiet()).load_reward(&p).unwrap();
    let (images, _) = world(3);
    let prompts: Vec<String> = ["fine", "bad one", "fine"].map(String::from).to_vec();
    let e = format!("{:#}", reward.score(&images, &prompts).unwrap_err());
    assert!(e.contains("reward.rhai") && e.contains("sample 1") && e.contains("\"bad one\"") && e.contains("not a finite number"), "{e}");
    // A map without a total, and a string, are errors too.
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { #{ kb: 1.0 } }", Limits::default());
    assert!(e.contains("without a `total`") && e.contains("sample 0"), "{e}");
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { \"high\" }", Limits::default());
    assert!(e.contains("not a number"), "{e}");
}

#[test]
fn prompt_scripts_are_reproducible_per_seed() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/examples/grammar_prompts.rhai");
    let draw = |seed: u64| -> Vec<String> {
        let mut prompts = ScriptSet::new(Limits::default(), quiet()).load_prompts(&p).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..20).map(|_| prompts.next_prompt(&mut rng).unwrap()).collect()
    };
    let a = draw(7);
    assert_eq!(a, draw(7));
    assert_ne!(a, draw(8));
    let distinct: std::collections::BTreeSet<_> = a.iter().collect();
    assert!(distinct.len() > 5, "{a:?}");
    // The shipped fixed list draws every caption eventually.
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prompts.rhai");
    let mut prompts = ScriptSet::new(Limits::default(), quiet()).load_prompts(&p).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let seen: std::collections::BTreeSet<_> = (0..200).map(|_| prompts.next_prompt(&mut rng).unwrap()).collect();
    assert_eq!(seen.len(), 8, "{seen:?}");
}

#[test]
fn prompt_meta_reaches_the_reward() {
    let dir = tempfile::tempdir().unwrap();
    let pp = write(dir.path(), "prompts.rhai", "fn prompt() { let k = rand_int(1, 3); #{ prompt: `p${k}`, meta: #{ k: k } } }");
    let rp = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { if \"k\" in meta { meta.k } else { 0 } }");
    let mut set = ScriptSet::new(Limits::default(), quiet());
    let mut prompts = set.load_prompts(&pp).unwrap();
    let reward = set.load_reward(&rp).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let drawn: Vec<String> = (0..4).map(|_| prompts.next_prompt(&mut rng).unwrap()).collect();
    let (images, _) = world(4);
    let scores = reward.score(&images, &drawn).unwrap();
    for (p, s) in drawn.iter().zip(&scores) {
        assert_eq!(format!("p{}", s.total), *p);
    }
}

#[test]
fn randomness_is_for_prompt_scripts_only() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { rand() }", Limits::default());
    assert!(e.contains("only available in prompt scripts"), "{e}");
}

#[test]
fn hot_reload_swaps_good_versions_and_keeps_the_old_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { 1.0 }\n");
    let mut set = ScriptSet::new(Limits::default(), quiet());
    let reward = set.load_reward(&p).unwrap();
    let (images, prompts) = world(2);
    let total = |r: &dyn Reward| r.score(&images, &prompts).unwrap()[0].total;
    assert!(set.reload().is_empty(), "nothing changed");
    let h1 = reward.hash();

    write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { 2.0 }\n");
    let r = set.reload();
    assert_eq!(r.len(), 1);
    assert!(matches!(&r[0].outcome, ReloadOutcome::Reloaded { old, new } if *old == h1 && *new == reward.hash()));
    assert_eq!(r[0].to_string(), format!("reloaded reward.rhai ({})", &reward.hash()[..8]));
    assert_eq!(total(&reward), 2.0);
    let h2 = reward.hash();

    write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  3.0 +\n}\n");
    let r = set.reload();
    match &r[0].outcome {
        ReloadOutcome::Kept { hash, error } => {
            assert_eq!(*hash, h2);
            assert!(error.contains("reward.rhai:3:1: "), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(total(&reward), 2.0);
    assert_eq!(reward.hash(), h2);

    // Compiles but fails its dry run: kept as well.
    write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { \"oops\" }\n");
    assert!(matches!(&set.reload()[0].outcome, ReloadOutcome::Kept { .. }));
    assert_eq!(total(&reward), 2.0);

    // Versions in use are saved once each.
    let saved = dir.path().join("run/scripts");
    set.save_versions(&saved).unwrap();
    assert_eq!(std::fs::read_to_string(saved.join(format!("reward.{h2}.rhai"))).unwrap(), "fn reward(img, prompt, meta) { 2.0 }\n");
    assert_eq!(set.hashes()["reward.rhai"], h2);
}

#[test]
fn hot_reload_sees_edited_modules() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "helpers.rhai", "fn value() { 1.0 }\n");
    let p = write(dir.path(), "reward.rhai", "import \"helpers\" as h;\nfn reward(img, prompt, meta) { h::value() }\n");
    let mut set = ScriptSet::new(Limits::default(), quiet());
    let reward = set.load_reward(&p).unwrap();
    let (images, prompts) = world(1);
    assert_eq!(reward.score(&images, &prompts).unwrap()[0].total, 1.0);
    write(dir.path(), "helpers.rhai", "fn value() { 5.0 }\n");
    assert!(matches!(set.reload()[0].outcome, ReloadOutcome::Reloaded { .. }));
    assert_eq!(reward.score(&images, &prompts).unwrap()[0].total, 5.0);
    // An error inside the module names the module's file.
    write(dir.path(), "helpers.rhai", "fn value() {\n  1.0 +\n}\n");
    match &set.reload()[0].outcome {
        ReloadOutcome::Kept { error, .. } => assert!(error.contains("helpers.rhai:3:1"), "{error}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn import_outside_the_scripts_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    let outside = write(dir.path(), "outside.rhai", "fn value() { 1.0 }\n");
    for path in ["../outside", outside.with_extension("").to_str().unwrap()] {
        let text = format!("import {path:?} as o;\nfn reward(img, prompt, meta) {{ o::value() }}\n");
        let e = load_err(&scripts, "reward.rhai", &text, Limits::default());
        assert!(e.contains("refused") && e.contains("reward.rhai"), "{e}");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, scripts.join("link.rhai")).unwrap();
        let e = load_err(&scripts, "reward.rhai", "import \"link\" as o;\nfn reward(img, prompt, meta) { o::value() }\n", Limits::default());
        assert!(e.contains("outside the scripts folder"), "{e}");
    }
}

#[test]
fn eval_is_disabled_and_variables_are_strict() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) { eval(\"1.0\") }", Limits::default());
    assert!(e.contains("reward.rhai:1:"), "{e}");
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  undefined_thing\n}", Limits::default());
    assert!(e.contains("reward.rhai:2:3: ") && e.contains("undefined_thing"), "{e}");
}

#[test]
fn print_and_debug_go_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let log: Log = Arc::new(move |l: &str| sink.lock().unwrap().push(l.to_string()));
    let p = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  print(`w=${img.width}`);\n  debug(1);\n  1.0\n}\n");
    ScriptSet::new(Limits::default(), log).load_reward(&p).unwrap();
    let lines = lines.lock().unwrap();
    assert!(lines.contains(&"[reward.rhai] w=32".to_string()), "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("[reward.rhai:3:3] 1")), "{lines:?}");
}

#[test]
fn context_and_image_functions() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "reward.rhai",
        r#"fn reward(img, prompt, meta) {
  let c = context();
  let g = img.to_gray();
  let m = img.mean_rgb();
  let h = img.hue_histogram(6);
  let hs = 0.0; for x in h { hs += x; }
  let px = img.pixel(0, 0);
  #{ total: c.epoch + c.reward_mean.len, last: if c.reward_mean.len > 0 { c.reward_mean[-1] } else { 0.0 },
     gray_sat: g.saturation(), crop_w: img.crop(1, 2, 5, 7).width, resized_h: img.resize(8, 4).height,
     m: m[0] + m[1] + m[2], b: img.brightness(), hist: hs, png: img.png_size(), px: px.len }
}"#,
    );
    let mut set = ScriptSet::new(Limits::default(), quiet());
    let reward = set.load_reward(&p).unwrap();
    set.set_context(Context { epoch: 3, reward_mean: vec![0.5, 0.25], reward_std: vec![0.1, 0.1] });
    let (images, prompts) = world(1);
    let s = &reward.score(&images, &prompts).unwrap()[0];
    assert_eq!(s.total, 5.0);
    assert_eq!(s.components["last"], 0.25);
    assert_eq!(s.components["gray_sat"], 0.0);
    assert_eq!(s.components["crop_w"], 5.0);
    assert_eq!(s.components["resized_h"], 4.0);
    assert!((s.components["m"] / 3.0 - s.components["b"]).abs() < 1e-12);
    assert!((s.components["hist"] - 1.0).abs() < 1e-9 || s.components["hist"] == 0.0);
    assert!(s.components["png"] > 0.0);
    assert_eq!(s.components["px"], 3.0);
    // Learned primitives with a model file that is not there: the error names the file.
    let p = write(dir.path(), "r2.rhai", "fn reward(img, prompt, meta) { aesthetic(img) }");
    let missing = dir.path().join("missing-clip.safetensors");
    let models = ddpo::reward::models::LazyModels::new(
        ddpo::reward::models::ModelPaths { clip: Some(missing), aesthetic: None },
        candle_core::Device::Cpu,
    );
    let e = match ScriptSet::new(Limits::default(), quiet()).with_models(models).load_reward(&p) {
        Ok(_) => panic!("a reward with a missing CLIP loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("missing-clip.safetensors") && e.contains("not found"), "{e}");
}

#[test]
fn shipped_scripts_pass_the_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [root.clone(), root.join("examples")] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "rhai") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 7, "{files:?}");
    for f in files {
        check_file(&f, &Limits::default(), quiet()).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[test]
fn api_md_matches_the_registration() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/API.md");
    let generated = api::markdown();
    if std::env::var_os("DDPO_WRITE_API_MD").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(on_disk == generated, "scripts/API.md is out of date: rerun with DDPO_WRITE_API_MD=1");
    let names: Vec<&str> = api::entries().iter().map(|e| e.name).collect();
    for expected in ["width", "height", "pixel", "mean_rgb", "brightness", "saturation", "hue_histogram", "to_gray", "crop", "resize",
        "jpeg_size", "png_size", "aesthetic", "clip_similarity", "rand", "rand_int", "choice", "weighted_choice", "context"] {
        assert!(names.contains(&expected), "{expected} is not registered");
    }
}

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
}

#[test]
fn cli_train_runs_scripts_and_keeps_their_versions() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.safetensors");
    ddpo::policy::Policy::new_random(ddpo::policy::PolicyConfig::tiny_test(), 0, &candle_core::Device::Cpu).unwrap().save(&model).unwrap();
    let reward = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  print(`epoch ${context().epoch}`);\n  #{ total: -img.jpeg_size(95), bright: img.brightness() }\n}\n");
    let prompts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prompts.rhai");
    let run = dir.path().join("run");
    let common = ["--model", model.to_str().unwrap(), "--epochs", "2", "--samples-per-epoch", "4", "--sample-batch-size", "2", "--train-batch-size", "2", "--steps", "2"];
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
