//! `ddpo repl`'s evaluation loop, driven line by line on a tiny random 16x16 policy: sampling,
//! rewards, `show`, options, reloads, training, multi-line input and errors that leave the
//! session running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ddpo::cli::repl::{open, Options};
use ddpo::script::repl::Repl;

struct Session {
    repl: Repl,
    dir: tempfile::TempDir,
    /// Lines the scripts printed.
    printed: Arc<Mutex<Vec<String>>>,
    /// The session's Ctrl-C flag.
    interrupt: Arc<AtomicBool>,
}

impl Session {
    fn new() -> Self {
        Self::with_hooks(None)
    }

    /// A session whose `scripts/hooks.rhai` is `hooks` (none when `None`); hook prints are kept.
    fn with_hooks(hooks_text: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let printed = Arc::new(Mutex::new(Vec::new()));
        let sink = printed.clone();
        let log: ddpo::script::Log = Arc::new(move |line: &str| sink.lock().unwrap().push(line.to_string()));
        let interrupt = Arc::new(AtomicBool::new(false));
        let hooks = hooks_text.is_some();
        let model = dir.path().join("tiny.safetensors");
        ddpo::family::Policy::new_random(ddpo::family::PolicyConfig::tiny_test(), 0, &candle_core::Device::Cpu).unwrap().save(&model).unwrap();
        let scripts = dir.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        std::fs::write(scripts.join("reward.rhai"), "fn reward(img, prompt, meta) {\n  #{ total: img.brightness(), kb: img.jpeg_size(95) }\n}\n").unwrap();
        std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/prompts.rhai"), scripts.join("prompts.rhai")).unwrap();
        if let Some(text) = hooks_text {
            std::fs::write(scripts.join("hooks.rhai"), text).unwrap();
        }
        let repl = open(Options {
            model,
            reward: scripts.join("reward.rhai"),
            prompts: scripts.join("prompts.rhai"),
            hooks: hooks.then(|| scripts.join("hooks.rhai")),
            run_dir: dir.path().join("run"),
            seed: 0,
            device: candle_core::Device::Cpu,
            log,
            interrupt: interrupt.clone(),
            vlm: None,
        })
        .unwrap();
        Self { repl, dir, printed, interrupt }
    }

    /// Output of one complete line.
    fn eval(&mut self, line: &str) -> String {
        self.repl.feed(line).unwrap_or_else(|| panic!("{line:?} left brackets open"))
    }

    fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }
}

#[test]
fn sample_score_and_show_images() {
    let mut s = Session::new();
    assert_eq!(s.eval("set(\"steps\", 3)"), "");
    assert_eq!(s.eval("let imgs = sample(\"a red circle\", 4);"), "");
    assert_eq!(s.eval("imgs"), "[Image 16x16, Image 16x16, Image 16x16, Image 16x16]\n");
    assert_eq!(s.eval("sample(\"a red circle\")"), "Image 16x16\n");
    // The loaded reward script, with and without meta, and the image API agree.
    let r = s.eval("reward(imgs[0], \"a red circle\", #{})");
    assert!(r.starts_with("#{\"kb\": ") && r.contains("\"total\": "), "{r}");
    assert_eq!(s.eval("reward(imgs[1], \"a red circle\").total == imgs[1].brightness()"), "true\n");
    // Different noise per image.
    assert_eq!(s.eval("imgs[0].png_size() != imgs[1].png_size() || imgs[0].mean_rgb() != imgs[1].mean_rgb()"), "true\n");

    let out = s.eval("show(imgs[2])");
    let png = s.run().join("show_001.png");
    assert!(out.contains(&format!("saved {}", png.display())), "{out}");
    // 16x16 scaled x4 to 64 columns: 32 text rows of 64 half-blocks, 24-bit colours.
    assert_eq!(out.matches('▀').count(), 64 * 32, "{out}");
    assert_eq!(out.matches("\x1b[0m\n").count(), 32);
    assert!(out.contains("\x1b[38;2;") && out.contains("\x1b[48;2;"));
    let saved = image::open(&png).unwrap().to_rgb8();
    assert_eq!(saved.dimensions(), (16, 16));
    let px = s.eval("imgs[2].pixel(3, 5)");
    let p = saved.get_pixel(3, 5).0;
    assert_eq!(px, format!("[{:?}, {:?}, {:?}]\n", p[0] as f64 / 255.0, p[1] as f64 / 255.0, p[2] as f64 / 255.0));
    let out = s.eval("show(imgs).len()");
    assert!(out.ends_with("4\n") && s.run().join("show_005.png").exists(), "{out}");
}

#[test]
fn errors_print_and_the_session_continues() {
    let mut s = Session::new();
    let e = s.eval("let x = ;");
    assert!(e.starts_with("<repl>:1:9: ") && e.contains("Syntax error"), "{e}");
    let e = s.eval("nope + 1");
    assert!(e.starts_with("<repl>:1:1: ") && e.contains("nope"), "{e}");
    let e = s.eval("sample(\"a red circle\", 1000)");
    assert!(e.contains("n must be between 1 and 64"), "{e}");
    let e = s.eval("loop {}");
    assert!(e.contains("exceeded the operation limit"), "{e}");
    let e = s.eval("set(\"bogus\", 1)");
    assert!(e.contains("unknown option") && e.contains("guidance"), "{e}");
    let e = s.eval("set(\"steps\", 0)");
    assert!(e.contains("set(\"steps\", 0)"), "{e}");
    let e = s.eval("set(\"steps\", 2)");
    assert!(e.contains("leaves none of the 2 sampling steps"), "{e}");
    // State survives the errors: variables, functions, printing, multi-line input.
    assert_eq!(s.eval("let a = 5;"), "");
    assert_eq!(s.eval("a * 2"), "10\n");
    assert_eq!(s.eval("fn double(x) { x * 2 }"), "");
    assert_eq!(s.eval("double(21)"), "42\n");
    assert_eq!(s.eval("print(\"hi\"); \"a string\""), "hi\n\"a string\"\n");
    assert_eq!(s.repl.feed("fn add(x, y) {"), None);
    assert!(s.repl.is_continuing());
    assert_eq!(s.repl.feed("  let s = \"}\"; // a } in a string and a comment"), None);
    assert_eq!(s.repl.feed("  x + y"), None);
    assert_eq!(s.eval("}"), "");
    assert_eq!(s.eval("add(a, double(1))"), "7\n");
    // Ctrl-C drops a half-typed input.
    assert_eq!(s.repl.feed("let b = ["), None);
    s.repl.cancel();
    assert_eq!(s.eval("a"), "5\n");
    assert!(s.eval("help()").contains("sample(prompt, n)"));
}

#[test]
fn set_reload_and_train() {
    let mut s = Session::new();
    for (k, v) in [("steps", "3"), ("train_batch_size", "2"), ("samples_per_epoch", "4"), ("sample_batch_size", "2"), ("lr", "1e-4"), ("guidance", "2.5")] {
        assert_eq!(s.eval(&format!("set(\"{k}\", {v})")), "", "{k}");
    }
    assert_eq!(s.eval("options().lr"), "0.0001\n");
    assert_eq!(s.eval("options().guidance"), "2.5\n");
    assert_eq!(s.eval("options().steps"), "3.0\n");

    assert_eq!(s.eval("reload()"), "no script changed\n");
    let reward = s.dir.path().join("scripts/reward.rhai");
    std::fs::write(&reward, "fn reward(img, prompt, meta) { 7.0 }\n").unwrap();
    let out = s.eval("reload()");
    assert!(out.starts_with("reloaded reward.rhai ("), "{out}");
    assert_eq!(s.eval("reward(sample(\"a red circle\"), \"a red circle\")"), "7.0\n");
    // A broken edit keeps the working version.
    std::fs::write(&reward, "fn reward(img, prompt, meta) {\n  7.0 +\n}\n").unwrap();
    let out = s.eval("reload()");
    assert!(out.contains("kept reward.rhai") && out.contains("reward.rhai:3:1: "), "{out}");
    std::fs::write(&reward, "fn reward(img, prompt, meta) { img.brightness() }\n").unwrap();

    let out = s.eval("train(2)");
    assert!(out.starts_with("reloaded reward.rhai ("), "{out}");
    assert!(out.contains("epoch   0  reward ") && out.contains("epoch   1  reward "), "{out}");
    assert!(out.contains("checkpoint: "), "{out}");
    let metrics = std::fs::read_to_string(s.run().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    // The rate applied: 1e-4 ramped over the default 16 warm-up steps, 2 steps per epoch.
    assert!(metrics.contains("\"lr\":0.0000125") && metrics.contains("\"lr\":0.000025"), "{metrics}");
    assert!(s.run().join("checkpoint/policy.safetensors").exists());
    // Training continues from where it stopped.
    assert!(s.eval("train(1)").contains("epoch   2  reward "));
}

/// Sets the options that make an epoch small.
fn small_epochs(s: &mut Session) {
    for (k, v) in [("steps", "3"), ("train_batch_size", "2"), ("samples_per_epoch", "4"), ("sample_batch_size", "2")] {
        assert_eq!(s.eval(&format!("set(\"{k}\", {v})")), "", "{k}");
    }
}

#[test]
fn train_calls_the_hooks_and_stops_on_request() {
    let hooks = "fn on_epoch_start(ctx) {\n  print(`start ${ctx.epoch} of ${ctx.epochs}`);\n  #{ lr: 0.001 * (ctx.epoch + 1) }\n}\nfn on_epoch_end(ctx) {\n  if ctx.epoch == 1 { #{ stop: true } }\n}\n";
    let mut s = Session::with_hooks(Some(hooks));
    small_epochs(&mut s);
    let out = s.eval("train(5)");
    assert!(out.contains("epoch   0  reward ") && out.contains("hooks: lr=1.000e-3"), "{out}");
    assert!(out.contains("epoch   1  reward ") && out.contains("hooks: lr=2.000e-3"), "{out}");
    assert!(out.contains("stopped by the hooks after epoch 1") && !out.contains("epoch   2"), "{out}");
    assert_eq!(s.eval("options().lr"), "0.002\n");
    assert_eq!(*s.printed.lock().unwrap(), ["[hooks.rhai] start 0 of 5", "[hooks.rhai] start 1 of 5"]);
    let metrics = std::fs::read_to_string(s.run().join("metrics.jsonl")).unwrap();
    let lr: Vec<f64> = metrics.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["hooks"]["lr"].as_f64().unwrap()).collect();
    assert_eq!(lr, [0.001, 0.002]);
}

#[test]
fn ctrl_c_stops_train_at_the_next_epoch_boundary() {
    let mut s = Session::new();
    small_epochs(&mut s);
    // A Ctrl-C from before train() is not for it.
    s.interrupt.store(true, Ordering::SeqCst);
    assert!(s.eval("train(1)").contains("epoch   0  reward "));
    // Ctrl-C (once) while a long train() runs: it finishes the epoch in progress and returns.
    let (flag, metrics) = (s.interrupt.clone(), s.run().join("metrics.jsonl"));
    let presser = std::thread::spawn(move || {
        while std::fs::read_to_string(&metrics).unwrap_or_default().lines().count() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        flag.store(true, Ordering::SeqCst);
    });
    let out = s.eval("train(200)");
    presser.join().unwrap();
    let last: usize = out.split("interrupted: stopped after epoch ").nth(1).and_then(|t| t.trim_end().split('\n').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{out}"));
    assert!((1..10).contains(&last) && out.contains("checkpoint: "), "{out}");
    assert!(!out.contains(&format!("epoch {:>3}  reward", last + 1)), "{out}");
    let records = std::fs::read_to_string(s.run().join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(records, last + 1);
    assert!(!s.interrupt.load(Ordering::SeqCst), "the flag is spent");
    // The session goes on.
    assert!(s.eval("train(1)").contains(&format!("epoch {:>3}  reward", last + 1)));
}
