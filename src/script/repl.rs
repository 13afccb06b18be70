//! The Rhai side of `ddpo repl`: an engine with the host API plus the REPL functions (`sample`,
//! `reward`, `show`, `train`, `reload`, `set`, `options`, `help`), a scope that persists across
//! lines, multi-line input while brackets are open, and errors as `<repl>:line:col: message`.
//! The model side (sampling, training) is a [`ReplHost`] supplied by the caller, so tests drive
//! [`Repl::feed`] with lines and read back its output without a terminal or a model file.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::RgbImage;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, Scope, AST, FLOAT, INT};

use super::{api, engine, Image, Limits, ScriptReward};
use crate::reward::Score;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// What the REPL needs from a loaded model and run.
pub trait ReplHost: Send + Sync {
    /// `n` images sampled for `prompt` with the current policy and sampler settings.
    fn sample(&self, prompt: &str, n: usize) -> anyhow::Result<Vec<RgbImage>>;
    /// Runs `epochs` DDPO epochs with the current scripts; returns one line per epoch.
    fn train(&self, epochs: usize) -> anyhow::Result<String>;
    /// Re-reads the scripts; returns what changed.
    fn reload(&self) -> anyhow::Result<String>;
    /// Sets a training or sampling option.
    fn set(&self, key: &str, value: f64) -> anyhow::Result<()>;
    /// The current options, as (name, value).
    fn options(&self) -> Vec<(String, f64)>;
}

/// One documented REPL function (listed by `help()` and in `scripts/API.md`).
pub struct ReplEntry {
    pub signature: &'static str,
    pub doc: &'static str,
}

/// The REPL functions, in the order they are registered.
pub const ENTRIES: &[ReplEntry] = &[
    ReplEntry { signature: "sample(prompt, n) -> [Image]", doc: "`n` images sampled for `prompt` with the loaded policy (current `steps`, `eta`, `guidance`, `seed`)." },
    ReplEntry { signature: "sample(prompt) -> Image", doc: "One image sampled for `prompt`." },
    ReplEntry { signature: "reward(img, prompt, meta) -> float or map", doc: "The loaded reward script's `reward` on one image: its total, or a map of its components and `total`." },
    ReplEntry { signature: "reward(img, prompt) -> float or map", doc: "The same with an empty `meta`." },
    ReplEntry { signature: "show(img) -> string", doc: "Draws the image in the terminal (ANSI half-blocks, 24-bit colour) and saves it as a PNG in the run folder; returns the PNG's path. `show([img, ..])` shows each." },
    ReplEntry { signature: "train(n)", doc: "Runs `n` DDPO epochs on the loaded policy with the current scripts and options, calling the hooks script's `on_epoch_start` / `on_epoch_end` (`--hooks`) at each boundary; metrics and checkpoints go to the run folder. Ctrl-C stops it after the current epoch." },
    ReplEntry { signature: "reload()", doc: "Re-reads the reward, prompt and hooks scripts now (train() also does, before each epoch)." },
    ReplEntry { signature: "set(name, value)", doc: "Sets an option: `lr`, `guidance`, `steps`, `eta`, `samples_per_epoch`, `sample_batch_size`, `train_batch_size`, `inner_epochs`, `clip_range`, `seed`." },
    ReplEntry { signature: "options() -> map", doc: "The current options." },
    ReplEntry { signature: "help()", doc: "Lists these functions." },
];

/// A REPL session: engine, persistent scope and functions, pending multi-line input, output.
pub struct Repl {
    engine: Engine,
    scope: Scope<'static>,
    functions: AST,
    pending: String,
    line: usize,
    out: Arc<Mutex<String>>,
    limits: Limits,
}

impl Repl {
    /// A session on `host`; `reward` is the loaded reward script (if any), `out_dir` is where
    /// `show` saves PNGs.
    pub fn new(host: Arc<dyn ReplHost>, reward: Option<Arc<ScriptReward>>, out_dir: PathBuf) -> Self {
        // Interactive calls (sampling, training) are long by design: no wall-clock limit, and
        // Ctrl-C belongs to the line editor.
        let limits = Limits { time_limit: Duration::from_secs(365 * 24 * 3600), ..Limits::default() };
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        let log: super::Log = Arc::new(move |line: &str| {
            let mut o = sink.lock().unwrap();
            o.push_str(line.strip_prefix("[<repl>] ").unwrap_or(line));
            o.push('\n');
        });
        let mut engine = engine::new_engine("<repl>", &std::env::current_dir().unwrap_or_default(), &limits, log);
        api::register(&mut engine, Arc::default(), crate::reward::models::LazyModels::default());
        register(&mut engine, host, reward, out_dir, out.clone());
        Self { engine, scope: Scope::new(), functions: AST::empty(), pending: String::new(), line: 0, out, limits }
    }

    /// Whether a line is being continued (brackets still open).
    pub fn is_continuing(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Drops a half-typed multi-line input (Ctrl-C).
    pub fn cancel(&mut self) {
        self.pending.clear();
    }

    /// Feeds one input line. Returns `None` while brackets are open (more lines needed), else
    /// the output of evaluating everything fed since: printed lines, then the value (or error).
    pub fn feed(&mut self, line: &str) -> Option<String> {
        self.line += 1;
        self.pending.push_str(line);
        self.pending.push('\n');
        if open_brackets(&self.pending) > 0 {
            return None;
        }
        let source = std::mem::take(&mut self.pending);
        if source.trim().is_empty() {
            return Some(String::new());
        }
        let result = self.eval(&source);
        let mut out = std::mem::take(&mut *self.out.lock().unwrap());
        match result {
            Ok(v) if v.is_unit() => {}
            Ok(v) => {
                out.push_str(&display(&v));
                out.push('\n');
            }
            Err(e) => {
                out.push_str(&e.to_string());
                out.push('\n');
            }
        }
        Some(out)
    }

    fn eval(&mut self, source: &str) -> Result<Dynamic, super::ScriptError> {
        let error = |e: &EvalAltResult| engine::script_error("<repl>", std::path::Path::new("."), e, &self.limits, None, None);
        let ast = self.engine.compile_with_scope(&self.scope, source).map_err(|e| error(&e.into()))?;
        let ast = self.functions.merge(&ast);
        let value = engine::within_limits(&self.limits, || self.engine.eval_ast_with_scope::<Dynamic>(&mut self.scope, &ast));
        // Functions defined on this line stay for later lines, even when the line failed.
        self.functions = ast.clone_functions_only();
        value.map_err(|e| error(&e))
    }
}

/// Unclosed `(`, `[`, `{` in `src`, ignoring strings, characters and comments.
pub fn open_brackets(src: &str) -> i64 {
    let mut depth = 0i64;
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            '"' | '`' | '\'' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'/') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    depth
}

/// A value as the REPL echoes it (images by size, not as a type name).
fn display(v: &Dynamic) -> String {
    if let Some(img) = v.clone().try_cast::<Image>() {
        return format!("Image {}x{}", img.rgb().width(), img.rgb().height());
    }
    if v.is_array() {
        let items: Vec<String> = v.clone().cast::<Array>().iter().map(display).collect();
        return format!("[{}]", items.join(", "));
    }
    if v.is_string() {
        return format!("{v:?}");
    }
    v.to_string()
}

fn err<T>(e: anyhow::Error) -> Res<T> {
    Err(format!("{e:#}").into())
}

fn score_value(s: Score) -> Dynamic {
    if s.components.is_empty() {
        return Dynamic::from_float(s.total);
    }
    let mut m: Map = s.components.into_iter().map(|(k, v)| (k.into(), Dynamic::from_float(v))).collect();
    m.insert("total".into(), Dynamic::from_float(s.total));
    m.into()
}

fn register(engine: &mut Engine, host: Arc<dyn ReplHost>, reward: Option<Arc<ScriptReward>>, out_dir: PathBuf, out: Arc<Mutex<String>>) {
    engine.register_fn("to_string", |img: &mut Image| format!("Image {}x{}", img.rgb().width(), img.rgb().height()));
    engine.register_fn("to_debug", |img: &mut Image| format!("Image {}x{}", img.rgb().width(), img.rgb().height()));

    let h = host.clone();
    let sample_n = move |prompt: &str, n: INT| -> Res<Array> {
        if !(1..=64).contains(&n) {
            return Err(format!("sample(prompt, {n}): n must be between 1 and 64").into());
        }
        match h.sample(prompt, n as usize) {
            Ok(images) => Ok(images.into_iter().map(|i| Dynamic::from(Image::new(i))).collect()),
            Err(e) => err(e),
        }
    };
    let one = sample_n.clone();
    engine.register_fn("sample", sample_n);
    engine.register_fn("sample", move |prompt: &str| -> Res<Dynamic> { Ok(one(prompt, 1)?.remove(0)) });

    let r3 = reward.clone();
    let score = move |img: Image, prompt: &str, meta: Map| -> Res<Dynamic> {
        let Some(r) = r3.as_ref() else { return Err("reward(): no reward script is loaded (start the REPL with --reward FILE.rhai)".into()) };
        r.score_with_meta(img.rgb(), prompt, meta).map(score_value).or_else(err)
    };
    let score2 = score.clone();
    engine.register_fn("reward", score);
    engine.register_fn("reward", move |img: Image, prompt: &str| score2(img, prompt, Map::new()));

    let shown = Arc::new(Mutex::new(0usize));
    let (dir, o) = (out_dir, out.clone());
    let show = move |img: Image| -> Res<rhai::ImmutableString> {
        let mut n = shown.lock().unwrap();
        *n += 1;
        let path = dir.join(format!("show_{:03}.png", *n));
        crate::render::save_png(img.rgb(), &path).or_else(err)?;
        let mut o = o.lock().unwrap();
        o.push_str(&crate::render::ansi::half_blocks(img.rgb(), 64));
        o.push_str(&format!("saved {}\n", path.display()));
        Ok(path.display().to_string().into())
    };
    let show_each = show.clone();
    engine.register_fn("show", show);
    engine.register_fn("show", move |images: Array| -> Res<Array> {
        images
            .into_iter()
            .map(|v| match v.try_cast::<Image>() {
                Some(img) => show_each(img).map(Dynamic::from),
                None => Err("show([..]): every element must be an Image".into()),
            })
            .collect()
    });

    let (h, o) = (host.clone(), out.clone());
    engine.register_fn("train", move |n: INT| -> Res<()> {
        if !(1..=10_000).contains(&n) {
            return Err(format!("train({n}): the number of epochs must be between 1 and 10000").into());
        }
        let report = h.train(n as usize).or_else(err)?;
        o.lock().unwrap().push_str(&report);
        Ok(())
    });
    let (h, o) = (host.clone(), out.clone());
    engine.register_fn("reload", move || -> Res<()> {
        let report = h.reload().or_else(err)?;
        o.lock().unwrap().push_str(&report);
        Ok(())
    });
    let h = host.clone();
    engine.register_fn("set", move |key: &str, value: FLOAT| -> Res<()> { h.set(key, value).or_else(err) });
    let h = host.clone();
    engine.register_fn("set", move |key: &str, value: INT| -> Res<()> { h.set(key, value as f64).or_else(err) });
    engine.register_fn("options", move || -> Map { host.options().into_iter().map(|(k, v)| (k.into(), Dynamic::from_float(v))).collect() });
    engine.register_fn("help", move || {
        let mut o = out.lock().unwrap();
        for e in ENTRIES {
            o.push_str(&format!("  {:<42} {}\n", e.signature, e.doc));
        }
        o.push_str("  and the script host API (img.brightness(), img.jpeg_size(95), ...): see scripts/API.md\n");
    });
}

/// The REPL section of `scripts/API.md`.
pub fn markdown() -> String {
    let mut out = String::from(
        "\n## REPL (`ddpo repl`)\n\n\
         Besides the host API above, the REPL has these functions. Variables and `fn` definitions\n\
         persist between lines; an unclosed bracket continues the input on the next line.\n\n\
         | function | description |\n|---|---|\n",
    );
    for e in ENTRIES {
        out.push_str(&format!("| `{}` | {} |\n", e.signature, e.doc));
    }
    out
}
