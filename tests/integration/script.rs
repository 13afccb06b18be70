//! The Rhai scripting host: rewards equal their Rust counterparts, errors carry `file:line:col`,
//! the sandbox stops runaway scripts and confines `import`, prompt scripts are reproducible per
//! seed, hot reload swaps good versions in and keeps the old one on failure, API.md is current,
//! `ddpo check`'s verdicts. The same scripts through the binary are in `tests/integration/script_cli.rs`.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fixtures::{quiet, write};

use ddpo::ddpo::PromptSource;
use ddpo::reward::jpeg::jpeg_kb;
use ddpo::reward::stats::mean_brightness;
use ddpo::reward::Reward;
use ddpo::script::{api, check_file, check_files, check_files_with, Context, Limits, Log, ReloadOutcome, ScriptSet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

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
        ddpo::reward::models::ModelPaths { clip: Some(missing), aesthetic: None, vlm: None },
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
    // Scripts that ask a vision-language model are checked against the loopback test server.
    let server = ddpo::reward::vlm::server::Server::start(0, Default::default()).unwrap();
    let vlm = ddpo::reward::vlm::VlmConfig { url: server.url(), ..Default::default() };
    for f in files {
        let models = ddpo::reward::models::LazyModels::default().with_vlm(Some(vlm.clone()));
        let result = check_files_with(std::slice::from_ref(&f), &Limits::default(), quiet(), models).pop().unwrap();
        result.unwrap_or_else(|e| panic!("{e:#}"));
    }
    assert!(server.stats().requests.load(std::sync::atomic::Ordering::SeqCst) > 0, "a VLM example was checked");
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
        "jpeg_size", "png_size", "judge", "aesthetic", "clip_similarity", "text_similarity", "vlm_ask", "vlm_score", "rand", "rand_int", "choice", "weighted_choice", "context"] {
        assert!(names.contains(&expected), "{expected} is not registered");
    }
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

/// `geneval` and `detect` in a script read world renders as the suite's detector does: a render of
/// its own caption is right on every clause, the same image against another shape is not, and
/// `detect` names the drawn shape.
#[test]
fn geneval_and_detect_primitives_score_world_renders() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "reward.rhai", "fn reward(img, prompt, meta) {\n  let g = geneval(img, prompt);\n  let d = detect(img);\n  #{ total: g.partial, strict: g.strict, count: g.count, objects: d.objects.len(), first: if d.objects.len() > 0 && d.objects[0].shape == \"circle\" { 1.0 } else { 0.0 } }\n}\n");
    let reward = ScriptSet::new(Limits::default(), quiet()).load_reward(&path).unwrap();
    let world = ddpo::world::ShapesWorld::default();
    let spec = ddpo::world::parse_caption("a red circle on a blue background").unwrap();
    let scene = ddpo::world::Scene::layout(&spec, 32, &mut ChaCha8Rng::seed_from_u64(3));
    let img = scene.render(world.config().supersample);
    let right = reward.score(&[img.clone()], &["a red circle on a blue background".into()]).unwrap().remove(0);
    assert_eq!((right.total, right.components["strict"], right.components["count"]), (1.0, 1.0, 1.0), "{right:?}");
    assert_eq!((right.components["objects"], right.components["first"]), (1.0, 1.0), "{right:?}");
    let wrong = reward.score(&[img], &["a red star on a blue background".into()]).unwrap().remove(0);
    assert_eq!(wrong.components["strict"], 0.0, "{wrong:?}");
    assert!(wrong.total < 1.0, "{wrong:?}");
    let e = format!("{:#}", reward.score(&[image::RgbImage::new(32, 32)], &["not a caption".into()]).unwrap_err());
    assert!(e.contains("geneval()") && e.contains("not a shapes-world caption"), "{e}");
}
