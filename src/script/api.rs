//! The host API that scripts see, registered in one place ([`register`]): the reward primitives
//! of [`crate::reward::registry`] (adapted to Rhai here: the `Image` type, the sandbox's pixel
//! budget, errors as script errors) and the script-only functions (randomness, `context()`),
//! declared through the `api!` macro. `scripts/API.md` ([`markdown`]) is generated from the
//! registration itself and cannot drift from it.
//!
//! Images are `Image` values (an `image::RgbImage`, shared, never mutated in place); colours are
//! in 0..1. Randomness draws from the run's seeded generator and exists only in prompt scripts.

use std::any::TypeId;
use std::cell::RefCell;
use std::sync::{Arc, RwLock};

use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rhai::{Array, Dynamic, Engine, EvalAltResult, ImmutableString, Map, FLOAT, INT};

use super::engine::charge_pixels;
use crate::reward::models::LazyModels;
use crate::reward::registry::{self, Arg, Form, Param, Primitive, Value};

type Res<T> = Result<T, Box<EvalAltResult>>;

/// An image handed to scripts: cheap to clone (shared pixels), immutable.
#[derive(Clone, Debug)]
pub struct Image(Arc<RgbImage>);

impl Image {
    pub fn new(img: RgbImage) -> Self {
        Self(Arc::new(img))
    }

    pub fn rgb(&self) -> &RgbImage {
        &self.0
    }
}

/// What the run tells scripts through `context()`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// The epoch about to run (0-based).
    pub epoch: usize,
    /// Optimiser steps taken so far in the run (all epochs).
    pub step: usize,
    /// Mean and standard deviation of the reward in each finished epoch, oldest first.
    pub reward_mean: Vec<f64>,
    pub reward_std: Vec<f64>,
}

impl Context {
    pub(crate) fn to_map(&self) -> Map {
        let floats = |v: &[f64]| -> Dynamic { v.iter().map(|&x| Dynamic::from_float(x)).collect::<Array>().into() };
        let mut m = Map::new();
        m.insert("epoch".into(), (self.epoch as INT).into());
        m.insert("step".into(), (self.step as INT).into());
        m.insert("reward_mean".into(), floats(&self.reward_mean));
        m.insert("reward_std".into(), floats(&self.reward_std));
        m
    }
}

/// One documented host function.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiEntry {
    /// The heading it is documented under in `scripts/API.md`.
    pub section: &'static str,
    pub name: &'static str,
    pub signature: &'static str,
    pub doc: &'static str,
}

thread_local! {
    /// The run's generator while a prompt script runs on this thread.
    static RNG: RefCell<Option<ChaCha8Rng>> = const { RefCell::new(None) };
}

/// Runs `f` (a prompt-script call) with `rand()` & co. drawing from `rng`, advancing it.
pub(crate) fn with_rng<T>(rng: &mut ChaCha8Rng, f: impl FnOnce() -> T) -> T {
    let previous = RNG.with(|r| r.replace(Some(rng.clone())));
    let out = f();
    if let Some(advanced) = RNG.with(|r| r.replace(previous)) {
        *rng = advanced;
    }
    out
}

fn draw<T>(what: &str, f: impl FnOnce(&mut ChaCha8Rng) -> Res<T>) -> Res<T> {
    RNG.with(|r| match r.borrow_mut().as_mut() {
        Some(rng) => f(rng),
        None => Err(format!("{what} is only available in prompt scripts (rewards must not be random)").into()),
    })
}

/// A script number (float or int) as f64.
pub(crate) fn number(v: &Dynamic) -> Option<f64> {
    v.as_float().ok().or_else(|| v.as_int().ok().map(|i| i as f64))
}

/// Registers the host API on `engine`; returns the documentation of what it registered.
pub(crate) fn register(engine: &mut Engine, context: Arc<RwLock<Context>>, models: LazyModels) -> Vec<ApiEntry> {
    engine.register_type_with_name::<Image>("Image");
    let mut docs = Vec::new();
    for section in registry::SECTIONS {
        for p in section.primitives {
            register_primitive(engine, p, models.clone());
            docs.push(ApiEntry { section: section.heading, name: p.name, signature: p.signature, doc: p.doc });
        }
    }
    register_script_only(engine, context, &mut docs);
    docs
}

/// Registers one reward primitive as a Rhai function (a property getter for [`Form::Getter`]).
fn register_primitive(engine: &mut Engine, p: &'static Primitive, models: LazyModels) {
    let types: Vec<TypeId> = p.params.iter().map(|t| match t {
        Param::Image => TypeId::of::<Image>(),
        Param::Int => TypeId::of::<INT>(),
        Param::Text => TypeId::of::<ImmutableString>(),
        Param::Texts => TypeId::of::<Array>(),
    }).collect();
    let name = match p.form {
        Form::Getter => format!("get${}", p.name),
        Form::Call => p.name.to_string(),
    };
    engine.register_raw_fn(name, types, move |_, args| call_primitive(p, &models, args));
}

/// Calls `p` with script arguments (of the types it was registered with) and converts its result.
fn call_primitive(p: &Primitive, models: &LazyModels, args: &mut [&mut Dynamic]) -> Res<Dynamic> {
    let args = args.iter().zip(p.params).map(|(a, t)| to_arg(p.name, *t, a)).collect::<Res<Vec<Arg>>>()?;
    let run = || (p.run)(&registry::Args { args: &args, models });
    let value = if registry::is_remote(p) { super::engine::off_the_clock(run) } else { run() }.map_err(|e| format!("{e:#}"))?;
    to_dynamic(value)
}

/// A primitive's result as a script value.
fn to_dynamic(value: Value) -> Res<Dynamic> {
    Ok(match value {
        Value::Int(v) => Dynamic::from_int(v),
        Value::Float(v) => Dynamic::from_float(v),
        Value::Floats(v) => v.into_iter().map(Dynamic::from_float).collect::<Array>().into(),
        Value::Image(img) => {
            // Charged once made: every primitive's image is bounded (1024 a side, or the input's size).
            charge_pixels(img.width() as u64 * img.height() as u64)?;
            Dynamic::from(Image::new(img))
        }
        Value::Map(m) => m.into_iter().map(|(k, v)| (k.into(), Dynamic::from_float(v))).collect::<Map>().into(),
        Value::Text(s) => s.into(),
        Value::List(items) => items.into_iter().map(to_dynamic).collect::<Res<Array>>()?.into(),
        Value::Record(fields) => fields.into_iter().map(|(k, v)| Ok((k.into(), to_dynamic(v)?))).collect::<Res<Map>>()?.into(),
    })
}

/// A script argument as the registry's [`Arg`] of type `param`; errors name the primitive.
fn to_arg(name: &str, param: Param, v: &Dynamic) -> Res<Arg> {
    let wrong = || format!("{name}(): unexpected argument type {}", super::engine::type_name(v));
    Ok(match param {
        Param::Image => Arg::Image(v.clone().try_cast::<Image>().ok_or_else(wrong)?.0),
        Param::Int => Arg::Int(v.as_int().map_err(|_| wrong())?),
        Param::Text => Arg::Text(v.clone().into_immutable_string().map_err(|_| wrong())?.to_string()),
        Param::Texts => Arg::Texts(
            v.clone()
                .try_cast::<Array>()
                .ok_or_else(wrong)?
                .into_iter()
                .map(|t| t.into_immutable_string().map(|s| s.to_string()).map_err(|ty| format!("{name}(): texts must be strings, got {ty}")))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Registers the functions that are not reward primitives: seeded randomness and the run context.
fn register_script_only(engine: &mut Engine, context: Arc<RwLock<Context>>, docs: &mut Vec<ApiEntry>) {
    let mut section: &'static str;
    macro_rules! api {
        (fn $name:literal, $sig:literal, $doc:literal, $f:expr) => {{
            engine.register_fn($name, $f);
            docs.push(ApiEntry { section, name: $name, signature: $sig, doc: $doc });
        }};
    }

    section = "Seeded randomness (prompt scripts only)";
    api!(fn "rand", "rand() -> float", "Uniform number in [0, 1) from the run's seeded generator. Prompt scripts only.",
        || -> Res<FLOAT> { draw("rand()", |r| Ok(r.random::<f64>())) });
    api!(fn "rand_int", "rand_int(a, b) -> int", "Uniform integer in a..=b (both included) from the run's generator. Prompt scripts only.",
        |a: INT, b: INT| -> Res<INT> {
            if a > b {
                return Err(format!("rand_int({a}, {b}): a must not be greater than b").into());
            }
            draw("rand_int()", |r| Ok(r.random_range(a..=b)))
        });
    api!(fn "choice", "choice(array) -> value", "One element of a non-empty array, uniformly, from the run's generator. Prompt scripts only.",
        |items: Array| -> Res<Dynamic> {
            if items.is_empty() {
                return Err("choice(): the array is empty".into());
            }
            draw("choice()", |r| Ok(items[r.random_range(0..items.len())].clone()))
        });
    api!(fn "weighted_choice", "weighted_choice(map) -> string",
        "A key of `#{ key: weight, .. }` with probability proportional to its (non-negative) weight, from the run's generator. Prompt scripts only.",
        |weights: Map| -> Res<rhai::ImmutableString> {
            let mut total = 0.0;
            for (k, v) in &weights {
                match number(v) {
                    Some(w) if w >= 0.0 && w.is_finite() => total += w,
                    _ => return Err(format!("weighted_choice(): the weight of {k:?} is not a non-negative number").into()),
                }
            }
            if total <= 0.0 {
                return Err("weighted_choice(): the weights must not all be zero".into());
            }
            draw("weighted_choice()", |r| {
                let mut x = r.random::<f64>() * total;
                let mut last = None;
                for (k, v) in &weights {
                    let w = number(v).unwrap_or(0.0);
                    if w > 0.0 {
                        last = Some(k);
                        if x < w {
                            return Ok(k.as_str().into());
                        }
                        x -= w;
                    }
                }
                Ok(last.expect("a positive weight").as_str().into())
            })
        });

    section = "The compositional suite";
    api!(fn "suite_prompts", "suite_prompts(half) -> [string]",
        "The compositional suite's prompts (its latest version) of one half: \"train\" (finetune on these), \"heldout\" (what `--eval-every` measures) or \"all\"; e.g. `choice(suite_prompts(\"train\"))` in a prompt script.",
        |half: &str| -> Res<Array> { suite_texts(half, None) });
    api!(fn "suite_prompts", "suite_prompts(half, category) -> [string]",
        "The same, of one category: single_object, two_object, counting, colors, position or color_attr.",
        |half: &str, category: &str| -> Res<Array> { suite_texts(half, Some(category)) });

    section = "The run";
    api!(fn "context", "context() -> map",
        "Read-only facts about the run: `epoch` (the epoch about to run, from 0), `step` (optimiser steps taken so far), `reward_mean` and `reward_std` (arrays, one entry per finished epoch).",
        move || -> Map { context.read().unwrap().to_map() });
}

/// The texts of the suite's prompts of `half` (and `category`), as a script array.
fn suite_texts(half: &str, category: Option<&str>) -> Res<Array> {
    use crate::world::suite::{suite, Category, Half, LATEST};
    let half = match half {
        "all" => None,
        h => Some(Half::from_name(h).ok_or_else(|| format!("suite_prompts(): half {h:?} is not \"train\", \"heldout\" or \"all\""))?),
    };
    let category = match category {
        Some(c) => Some(Category::ALL.into_iter().find(|k| k.name() == c).ok_or_else(|| {
            format!("suite_prompts(): category {c:?} is not one of {}", Category::ALL.map(Category::name).join(", "))
        })?),
        None => None,
    };
    // Built once: prompt scripts call this for every prompt they draw.
    static PROMPTS: std::sync::OnceLock<Vec<crate::world::suite::SuitePrompt>> = std::sync::OnceLock::new();
    let prompts = PROMPTS.get_or_init(|| suite(LATEST).unwrap_or_default());
    Ok(prompts
        .iter()
        .filter(|p| half.is_none_or(|h| p.half == h) && category.is_none_or(|c| p.category == c))
        .map(|p| Dynamic::from(p.text.clone()))
        .collect())
}

/// The documentation of the host API, in registration order.
pub fn entries() -> Vec<ApiEntry> {
    register(&mut Engine::new_raw(), Arc::default(), LazyModels::default())
}

/// `scripts/API.md`: the host API as Markdown, generated from [`register`].
pub fn markdown() -> String {
    let mut out = String::from(
        "# Script host API\n\n\
         Generated from the registrations in `src/reward/registry.rs` (the reward primitives) and\n\
         `src/script/` (`ddpo::script::api_md()`); a test keeps this file in sync.\n\n\
         Reward scripts define `fn reward(img, prompt, meta)` returning a number or a map of named\n\
         components with a `total`. Prompt scripts define `fn prompt()` returning a string or\n\
         `#{ prompt: \"..\", meta: #{ .. } }`; the reward receives that `meta`. Scripts may `import`\n\
         other `.rhai` files from their own folder only. `print` and `debug` go to the training log.\n",
    );
    let mut section = "";
    for e in entries() {
        if e.section != section {
            section = e.section;
            out.push_str(&format!("\n## {section}\n\n| function | description |\n|---|---|\n"));
        }
        out.push_str(&format!("| `{}` | {} |\n", e.signature, e.doc));
    }
    out
}
