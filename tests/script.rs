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
use ddpo::script::{api, check_file, check_files, Context, Limits, Log, ReloadOutcome, ScriptSet};
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
fn shipped_default_prompts_match_builtin() {
    // `ddpo train` with no flags uses scripts/prompts.rhai: the same draws as the built-in list.
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prompts.rhai");
    let mut script = ScriptSet::new(Limits::default(), quiet()).load_prompts(&p).unwrap();
    let mut builtin = ddpo::ddpo::FixedPrompts::shapes_default();
    let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(5));
    let a: Vec<String> = (0..64).map(|_| script.next_prompt(&mut r1).unwrap()).collect();
    let b: Vec<String> = (0..64).map(|_| builtin.next_prompt(&mut r2).unwrap()).collect();
    assert_eq!(a, b, "scripts/prompts.rhai should list {:?}", builtin.0);
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
fn judge_passes_world_renders_and_fails_a_wrong_background() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "judge.rhai", "fn reward(img, prompt, meta) { let j = judge(img, prompt); #{ total: j.both, bg: j.background, colour: j.shape_colour } }\n");
    let reward = ScriptSet::new(Limits::default(), quiet()).load_reward(&p).unwrap();
    let (images, prompts) = world(8);
    for s in reward.score(&images, &prompts).unwrap() {
        assert_eq!((s.total, s.components["bg"], s.components["colour"]), (1.0, 1.0, 1.0), "a ground-truth render failed the judge");
    }
    // The same images against their captions with the background changed to a colour the
    // caption does not use at all.
    let swapped: Vec<String> = prompts
        .iter()
        .map(|p| {
            let head = p.rsplit_once(" on a ").unwrap().0;
            let other = ["red", "green", "blue", "yellow", "white", "black"].into_iter().find(|c| !p.contains(c)).unwrap();
            format!("{head} on a {other} background")
        })
        .collect();
    for (s, q) in reward.score(&images, &swapped).unwrap().iter().zip(&swapped) {
        assert_eq!(s.components["bg"], 0.0, "{q:?} passed on an image of another background");
    }
    let e = format!("{:#}", reward.score(&images[..1], &["not a caption at all".to_string()]).unwrap_err());
    assert!(e.contains("judge()") && e.contains("not a shapes-world caption"), "{e}");
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
    assert!(e.contains("reward.rhai:3:") && e.contains("reward() exceeded the operation limit (max_operations = 1000000)") && e.contains("sample 0"), "{e}");
    // With the defaults, whichever limit comes first stops it within a few seconds (the bound is
    // loose: the 1 s deadline plus the positioning replay, on a loaded 2-core CI machine).
    let t = Instant::now();
    let e = load_err(dir.path(), "reward.rhai", endless, Limits::default());
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert!(e.contains("reward.rhai:3:") && e.contains("reward() exceeded the "), "{e}");
}

#[test]
fn slow_script_is_stopped_by_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { max_operations: 0, time_limit: Duration::from_millis(200), ..Limits::default() }; // 0: unlimited
    let t = Instant::now();
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  loop { img.resize(64, 64); }\n}\n", limits);
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert!(e.contains("reward.rhai:2:") && e.contains("reward() exceeded the time limit (time_limit = 200 ms"), "{e}");
}

#[test]
fn deep_recursion_and_huge_data_are_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), "reward.rhai", "fn f(n) { f(n + 1) }\nfn reward(img, prompt, meta) { f(0) }\n", Limits::default());
    assert!(e.contains("reward.rhai:1:17: reward() exceeded the call depth limit (max_call_levels = 32)"), "{e}");
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  let s = \"x\";\n  loop { s += s; }\n}\n", Limits::default());
    assert!(e.contains("reward.rhai:3:") && e.contains("size limit of a string (max_string_size = 65536)"), "{e}");
    let e = load_err(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  let a = [];\n  loop { a.push(img.resize(64, 64)); }\n}\n", Limits { max_image_pixels: 10_000, ..Limits::default() });
    assert!(e.contains("reward.rhai:3:") && e.contains("image memory limit (max_image_pixels = 10000"), "{e}");
}

/// The hostile corpus: each script in tests/fixtures/hostile states the error it must produce
/// (`// expect: ...`) and the line it must name (`// at: N`); each fails within a few seconds.
#[test]
fn hostile_scripts_fail_fast_with_clear_positioned_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let header = |key: &str| text.lines().find_map(|l| l.strip_prefix(&format!("// {key}: ")).map(str::to_string));
        let expect = header("expect").unwrap_or_else(|| panic!("{} has no `// expect:` line", file.display()));
        let t = Instant::now();
        let e = match ScriptSet::new(Limits::default(), quiet()).load_reward(&file) {
            Ok(_) => panic!("{} loaded", file.display()),
            Err(e) => format!("{e:#}"),
        };
        let took = t.elapsed();
        println!("{took:>8.2?}  {e}");
        assert!(took < Duration::from_secs(10), "{}: took {took:?}", file.display());
        assert!(e.contains(&expect), "{}: expected {expect:?} in {e}", file.display());
        assert!(e.starts_with(&file.display().to_string()), "{e}");
        if let Some(line) = header("at") {
            assert!(e.starts_with(&format!("{}:{line}:", file.display())), "expected line {line}: {e}");
        }
    }
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
  #{ total: c.epoch + c.reward_mean.len, step: c.step, last: if c.reward_mean.len > 0 { c.reward_mean[-1] } else { 0.0 },
     gray_sat: g.saturation(), crop_w: img.crop(1, 2, 5, 7).width, resized_h: img.resize(8, 4).height,
     m: m[0] + m[1] + m[2], b: img.brightness(), hist: hs, png: img.png_size(), px: px.len }
}"#,
    );
    let mut set = ScriptSet::new(Limits::default(), quiet());
    let reward = set.load_reward(&p).unwrap();
    set.set_context(Context { epoch: 3, step: 7, reward_mean: vec![0.5, 0.25], reward_std: vec![0.1, 0.1] });
    let (images, prompts) = world(1);
    let s = &reward.score(&images, &prompts).unwrap()[0];
    assert_eq!(s.total, 5.0);
    assert_eq!(s.components["last"], 0.25);
    assert_eq!(s.components["step"], 7.0);
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
    let generated = ddpo::script::api_md();
    if std::env::var_os("DDPO_WRITE_API_MD").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(on_disk == generated, "scripts/API.md is out of date: rerun with DDPO_WRITE_API_MD=1");
    let names: Vec<&str> = api::entries().iter().map(|e| e.name).collect();
    for expected in ["width", "height", "pixel", "mean_rgb", "brightness", "saturation", "hue_histogram", "to_gray", "crop", "resize",
        "jpeg_size", "png_size", "judge", "aesthetic", "clip_similarity", "rand", "rand_int", "choice", "weighted_choice", "context"] {
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
fn check_names_near_misses_of_entry_points() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str| {
        let p = write(dir.path(), name, text);
        (p.display().to_string(), check_file(&p, &Limits::default(), quiet()).map_err(|e| format!("{e:#}")))
    };
    let (file, r) = check("x.rhai", "// a reward with a typo

fn rewrd(img, prompt, meta) {
  img.brightness()
}
");
    let e = r.unwrap_err();
    assert!(e.contains(&format!("{file}:3:1: fn rewrd(img, prompt, meta) looks like a misspelt fn reward(img, prompt, meta)")), "{e}");
    let (file, r) = check("y.rhai", "// a reward missing parameters

fn reward(img) {
  img.brightness()
}
");
    let e = r.unwrap_err();
    assert!(e.contains(&format!("{file}:3:1: fn reward(img) takes 1 parameter; a reward is fn reward(img, prompt, meta)")), "{e}");
    let (file, r) = check("hooks.rhai", "fn on_epoch_start(ctx) { }

  fn on_epoch_ned(ctx) { }
");
    let e = r.unwrap_err();
    assert!(e.contains(&format!("{file}:3:3: fn on_epoch_ned(ctx) looks like a misspelt fn on_epoch_end(ctx)")), "{e}");
    // Helpers whose names are no near miss stay a module; a reward may define any helper.
    let (_, r) = check("helpers.rhai", "fn clamp(x, lo, hi) { if x < lo { lo } else if x > hi { hi } else { x } }
fn score(img) { img.brightness() }
");
    assert!(r.as_ref().is_ok_and(|s| s.starts_with("module")), "{r:?}");
    let (_, r) = check("r.rhai", "fn rewards(img) { img.brightness() }
fn reward(img, prompt, meta) { rewards(img) }
");
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn check_treats_an_imported_file_as_a_module_on_purpose() {
    let dir = tempfile::tempdir().unwrap();
    let module = write(dir.path(), "parts.rhai", "fn rewards(img) { [img.brightness(), img.saturation()] }
");
    let main = write(dir.path(), "main.rhai", "import \"parts\" as p;\nfn reward(img, prompt, meta) { p::rewards(img)[0] }\n");
    let alone = check_file(&module, &Limits::default(), quiet()).map_err(|e| format!("{e:#}"));
    assert!(alone.as_ref().is_err_and(|e| e.contains("parts.rhai:1:1: fn rewards(img) looks like a misspelt fn reward(img, prompt, meta)")), "{alone:?}");
    let results = check_files(&[main, module], &Limits::default(), quiet());
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let summary = results[1].as_ref().unwrap();
    assert_eq!(summary, "module imported by main.rhai (compiled)");
}

#[test]
fn cli_check_fails_on_a_near_miss() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "x.rhai", "\n\nfn rewrd(img, prompt, meta) { 1.0 }\n");
    let (ok, stdout, stderr) = ddpo(&["check", bad.to_str().unwrap()]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains(&format!("{}:3:1: fn rewrd(img, prompt, meta) looks like a misspelt fn reward(img, prompt, meta)", bad.display())), "{stdout}");
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

/// `ddpo check` on a hooks script: ok, or `file:line:col: message` at the offending key.
fn check_hooks(dir: &Path, text: &str) -> Result<String, String> {
    let p = write(dir, "hooks.rhai", text);
    check_file(&p, &Limits::default(), quiet()).map_err(|e| format!("{e:#}"))
}

#[test]
fn hook_overrides_are_validated_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let ok = check_hooks(dir.path(), "fn on_epoch_start(ctx) {\n  #{ lr: ctx.base_lr / 2, guidance: 3, weights: #{ kb: -1 }, prompts: [\"a red circle\"] }\n}\n").unwrap();
    assert!(ok.contains("on_epoch_start returns lr=1.500e-4 guidance=3 weights={kb: -1} prompts=1 listed"), "{ok}");
    let ok = check_hooks(dir.path(), "fn on_epoch_end(ctx) {\n  if ctx.metrics.reward_mean >= 0.0 { #{ stop: true } }\n}\n").unwrap();
    assert!(ok.contains("on_epoch_start returns nothing, on_epoch_end stop"), "{ok}");
    let bad = |text: &str| check_hooks(dir.path(), text).unwrap_err();
    // The key the hook returned, even when another branch writes the same key.
    let e = bad("fn on_epoch_start(ctx) {\n  if ctx.epoch > 5 { return #{ lr: 1e-4 }; }\n  #{ guidance: 2.0,\n     lr: -0.5 }\n}\n");
    assert!(e.ends_with("hooks.rhai:4:6: on_epoch_start(): `lr` must be a positive number, got -0.5 (float)"), "{e}");
    let e = bad("fn on_epoch_start(ctx) {\n  #{ lrr: 0.1 }\n}\n");
    assert!(e.ends_with("hooks.rhai:2:6: on_epoch_start() returned unknown key `lrr`; the keys are lr, guidance, weights, prompts, stop"), "{e}");
    let e = bad("fn on_epoch_start(ctx) {\n  let o = #{};\n  o.guidance = \"high\";\n  o\n}\n");
    assert!(e.contains("hooks.rhai:3:5: on_epoch_start(): `guidance` must be a number >= 0, got high (string)"), "{e}");
    let e = bad("fn on_epoch_start(ctx) {\n  #{ weights: #{ kb: \"x\" } }\n}\n");
    assert!(e.contains("hooks.rhai:2:18: ") && e.contains("the weight of `kb` must be a finite number"), "{e}");
    let e = bad("fn on_epoch_start(ctx) {\n  #{ prompts: [\"\"] }\n}\n");
    assert!(e.contains("hooks.rhai:2:6: ") && e.contains("non-empty strings"), "{e}");
    let e = bad("fn on_epoch_start(ctx) { 0.5 }\n");
    assert!(e.contains("hooks.rhai:1:1: on_epoch_start() returned 0.5 (float); expected nothing or a map"), "{e}");
    let e = bad("fn on_epoch_end(ctx) {\n  #{ lr: 0.1 }\n}\n");
    assert!(e.contains("hooks.rhai:2:6: on_epoch_end() returned unknown key `lr`; the keys are stop"), "{e}");
    let e = bad("fn on_epoch_start() {\n  #{ stop: true }\n}\n");
    assert!(e.contains("hooks.rhai:1:1: `fn on_epoch_start` must take one parameter"), "{e}");
    let e = bad("fn on_epoch_start(ctx) {\n  ctx.nope()\n}\n");
    assert!(e.contains("hooks.rhai:2:") && e.contains("nope"), "{e}");
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

#[test]
fn cli_train_applies_hook_overrides_and_stops_early() {
    let dir = tempfile::tempdir().unwrap();
    let reward = write(dir.path(), "reward.rhai", HOOKED_REWARD);
    let hooks = write(dir.path(), "hooks.rhai", HOOKS);
    let run = dir.path().join("run");
    let mut args: Vec<String> = ["train", "--run-dir", run.to_str().unwrap(), "--reward", reward.to_str().unwrap(), "--hooks", hooks.to_str().unwrap(), "--epochs", "10"]
        .map(String::from)
        .to_vec();
    args.extend(tiny_train_args(dir.path()));
    let (ok, _, stderr) = ddpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{stderr}");
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
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
    assert!(!stderr.contains("note: "), "{stderr}");
    let m: serde_json::Value = serde_json::from_str(std::fs::read_to_string(project.join("run/metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(m["reward_mean"], 100.0);
    assert_eq!(m["lr"], applied_lr(&[m.clone()], 0, 0.002));
    let names: Vec<&String> = m["scripts"].as_object().unwrap().keys().collect();
    assert_eq!(names, ["hooks.rhai", "prompts.rhai", "reward.rhai"]);
}
