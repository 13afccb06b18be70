//! Schedule hooks (`hooks.rhai`): `fn on_epoch_start(ctx)` may return a map of overrides for the
//! coming epoch (`lr`, `guidance`, reward component `weights`, `prompts`, `stop`), and
//! `fn on_epoch_end(ctx)` may log or return `#{ stop: true }`. Both are optional.
//!
//! - [`ScriptHooks`]: the script, reloaded like the others by [`super::ScriptSet`].
//! - [`Overrides`]: a hook's return value, validated (unknown keys, wrong types and bad numbers
//!   are `hooks.rhai:line:col: message` errors pointing at the key).
//! - [`HookRunner`]: runs the hooks at epoch boundaries and applies their overrides to the
//!   training settings. Overrides are settings: each stays in effect until a later hook changes
//!   it (like `set()` in the REPL). A hook that fails, or
//!   returns a bad value, changes nothing: the previous settings stay.
//!
//! **Weights.** With `weights: #{ name: w, .. }` in effect, the reward's total (a script's or a
//! built-in's) is recombined from its components: `total = sum of w * component` over the
//! weighted names only; the reward's own `total` and unweighted components are still logged but
//! do not count. Every weighted name must be a component the reward returns. `weights: #{}`
//! turns recombination off.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use rand_chacha::ChaCha8Rng;
use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::api::number;
use super::{Context, Host, ScriptError, Shared, Version};
use crate::ddpo::{FixedPrompts, PromptSource, TrainConfig};
use crate::family::Family;
use crate::reward::{Reward, Weights};

/// The entry points of a hooks script.
pub const ON_EPOCH_START: &str = "on_epoch_start";
pub const ON_EPOCH_END: &str = "on_epoch_end";

/// The keys `on_epoch_start` may return (`on_epoch_end` may only return `stop`).
pub const START_KEYS: [&str; 5] = ["lr", "guidance", "weights", "prompts", "stop"];

/// A hooks script; the version it runs can be swapped by [`super::ScriptSet::reload`].
pub struct ScriptHooks {
    pub(crate) host: Arc<Host>,
    pub(crate) current: Arc<RwLock<Arc<Version>>>,
}

/// What a hook returned: the settings to change (absent: unchanged) and whether to stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub lr: Option<f64>,
    pub guidance: Option<f64>,
    pub weights: Option<BTreeMap<String, f64>>,
    /// A new prompt list; empty: back to the run's own prompts.
    pub prompts: Option<Vec<String>>,
    pub stop: bool,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// As recorded in `metrics.jsonl` (`"hooks": {..}`): only the keys the hook returned.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if let Some(lr) = self.lr {
            m.insert("lr".into(), lr.into());
        }
        if let Some(g) = self.guidance {
            m.insert("guidance".into(), g.into());
        }
        if let Some(w) = &self.weights {
            m.insert("weights".into(), serde_json::json!(w));
        }
        if let Some(p) = &self.prompts {
            m.insert("prompts".into(), serde_json::json!(p));
        }
        if self.stop {
            m.insert("stop".into(), true.into());
        }
        serde_json::Value::Object(m)
    }

    /// Reads back a `"hooks"` record of `metrics.jsonl` (for `--resume`).
    pub fn from_json(v: &serde_json::Value) -> Self {
        let weights = v["weights"].as_object().map(|w| w.iter().filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).collect());
        let prompts = v["prompts"].as_array().map(|p| p.iter().filter_map(|x| x.as_str().map(String::from)).collect());
        Self { lr: v["lr"].as_f64(), guidance: v["guidance"].as_f64(), weights, prompts, stop: false }
    }

    /// One line for the epoch log, e.g. `lr=1.0e-4 weights={jpeg_kb: 0.5}`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(lr) = self.lr {
            parts.push(format!("lr={lr:.3e}"));
        }
        if let Some(g) = self.guidance {
            parts.push(format!("guidance={g}"));
        }
        if let Some(w) = &self.weights {
            let w: Vec<String> = w.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            parts.push(format!("weights={{{}}}", w.join(", ")));
        }
        if let Some(p) = &self.prompts {
            parts.push(if p.is_empty() { "prompts=(the run's)".into() } else { format!("prompts={} listed", p.len()) });
        }
        if self.stop {
            parts.push("stop".into());
        }
        parts.join(" ")
    }
}

impl ScriptHooks {
    /// Content hash of the version in use.
    pub fn hash(&self) -> String {
        self.current.read().unwrap().hash.clone()
    }

    /// The file name, e.g. `hooks.rhai`.
    pub fn file_name(&self) -> String {
        self.host.file_name()
    }

    /// Calls `on_epoch_start(ctx)` if defined; returns its overrides (none when it returns
    /// nothing), not yet checked against a trainer (see [`HookRunner::epoch_start`]).
    pub fn on_epoch_start(&self, ctx: Map) -> Result<Overrides, ScriptError> {
        let version = self.current.read().unwrap().clone();
        call_hook(&self.host, &version, ON_EPOCH_START, ctx, &START_KEYS)
    }

    /// Calls `on_epoch_end(ctx)` if defined; returns whether it asked to stop.
    pub fn on_epoch_end(&self, ctx: Map) -> Result<bool, ScriptError> {
        let version = self.current.read().unwrap().clone();
        Ok(call_hook(&self.host, &version, ON_EPOCH_END, ctx, &["stop"])?.stop)
    }
}

pub(crate) fn call_hook(host: &Host, version: &Version, name: &str, ctx: Map, keys: &[&str]) -> Result<Overrides, ScriptError> {
    if !Host::defines(version, name, 1) {
        return Ok(Overrides::default());
    }
    let value = host.call(version, name, vec![ctx.clone().into()])?;
    parse(&value, name, keys).map_err(|bad| bad.locate(host, version, name, ctx))
}

/// A bad value a hook returned: the key it is under (if any) and what is wrong.
struct BadValue {
    key: Option<String>,
    message: String,
}

impl BadValue {
    fn new(key: Option<&str>, message: String) -> Self {
        Self { key: key.map(String::from), message }
    }

    /// The error at `key` as written in the hook `func`: searched from the line the call
    /// returned from (found by replaying it with the same `ctx`), else from the function's start;
    /// at the function itself when the key is not written there literally.
    fn locate(self, host: &Host, version: &Version, func: &str, ctx: Map) -> ScriptError {
        let hint = self.key.as_ref().and_then(|_| host.last_line(version, func, vec![ctx.into()]));
        let (line, col) = key_position(&version.source, func, self.key.as_deref(), hint);
        ScriptError { file: host.display.clone(), line, col, message: self.message }
    }
}

/// Checks that a hooks script defines its entry points with one parameter (`ctx`), if at all.
pub(crate) fn check_defines(host: &Host, version: &Version) -> Result<(), ScriptError> {
    for name in [ON_EPOCH_START, ON_EPOCH_END] {
        if version.ast.iter_functions().any(|f| f.name == name && f.params.len() != 1) {
            let (line, col) = key_position(&version.source, name, None, None);
            let message = format!("`fn {name}` must take one parameter: `fn {name}(ctx)`");
            return Err(ScriptError { file: host.display.clone(), line, col, message });
        }
    }
    if !Host::defines(version, ON_EPOCH_START, 1) && !Host::defines(version, ON_EPOCH_END, 1) {
        return Err(ScriptError::new(&host.display, "a hooks script must define `fn on_epoch_start(ctx)` and/or `fn on_epoch_end(ctx)`"));
    }
    Ok(())
}

/// Validates a hook's return value: `()` (no overrides) or a map of the allowed `keys`.
fn parse(value: &Dynamic, func: &str, keys: &[&str]) -> Result<Overrides, BadValue> {
    if value.is_unit() {
        return Ok(Overrides::default());
    }
    let Some(map) = value.clone().try_cast::<Map>() else {
        return Err(BadValue::new(None, format!("{func}() returned {value} ({}); expected nothing or a map like #{{ {}: .. }}", super::engine::type_name(value), keys[0])));
    };
    let mut out = Overrides::default();
    for (k, v) in &map {
        let key = k.as_str();
        if !keys.contains(&key) {
            return Err(BadValue::new(Some(key), format!("{func}() returned unknown key `{key}`; the keys are {}", keys.join(", "))));
        }
        let bad = |what: &str| BadValue::new(Some(key), format!("{func}(): `{key}` {what}, got {v} ({})", super::engine::type_name(v)));
        match key {
            "lr" => match number(v) {
                Some(x) if x > 0.0 && x.is_finite() => out.lr = Some(x),
                _ => return Err(bad("must be a positive number")),
            },
            "guidance" => match number(v) {
                Some(x) if x >= 0.0 && x.is_finite() => out.guidance = Some(x),
                _ => return Err(bad("must be a number >= 0")),
            },
            "stop" => out.stop = v.as_bool().map_err(|_| bad("must be true or false"))?,
            "weights" => {
                let w = v.clone().try_cast::<Map>().ok_or_else(|| bad("must be a map of component names to numbers, like #{ jpeg_kb: 0.5 }"))?;
                let mut weights = BTreeMap::new();
                for (name, x) in w {
                    match number(&x) {
                        Some(x) if x.is_finite() => weights.insert(name.to_string(), x),
                        _ => return Err(BadValue::new(Some(name.as_str()), format!("{func}(): the weight of `{name}` must be a finite number, got {x} ({})", super::engine::type_name(&x)))),
                    };
                }
                out.weights = Some(weights);
            }
            "prompts" => {
                let list = v.clone().try_cast::<Array>().ok_or_else(|| bad("must be an array of prompt strings (empty: the run's own prompts)"))?;
                let mut prompts = Vec::new();
                for p in list {
                    match p.clone().into_string() {
                        Ok(s) if !s.trim().is_empty() => prompts.push(s),
                        _ => return Err(bad("must hold non-empty strings only")),
                    }
                }
                out.prompts = Some(prompts);
            }
            _ => unreachable!("checked against keys"),
        }
    }
    Ok(out)
}

/// 1-based (line, column) of `key` written as a map key (`key:`, `"key":`) or property (`.key`)
/// inside `fn func`, else of `fn func` itself, else unknown.
/// `hint`: a line inside the function to search from first (where the value was returned).
fn key_position(source: &str, func: &str, key: Option<&str>, hint: Option<usize>) -> (Option<usize>, Option<usize>) {
    let Some(start) = find_fn(source, func) else { return (None, None) };
    let end = start + find_next_fn(&source[start..]).unwrap_or(source.len() - start);
    let line_start = |l: usize| source.split_inclusive('\n').take(l.saturating_sub(1)).map(str::len).sum::<usize>();
    let hinted = hint.map(line_start).filter(|&h| h > start && h < end);
    let search = |from: usize| key.and_then(|key| find_key(&source[from..end], key)).map(|off| from + off);
    let found = hinted.and_then(search).or_else(|| search(start)).unwrap_or(start);
    let before = &source[..found];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (Some(line), Some(col))
}

fn find_fn(source: &str, func: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = source[from..].find("fn ") {
        let at = from + i;
        let rest = source[at + 3..].trim_start();
        if rest.starts_with(func) && rest[func.len()..].trim_start().starts_with('(') && (at == 0 || !is_ident(source[..at].chars().last().unwrap())) {
            return Some(at);
        }
        from = at + 3;
    }
    None
}

/// Offset of the next `fn ` after the first (the end of the current function, roughly).
fn find_next_fn(body: &str) -> Option<usize> {
    body[3..].find("\nfn ").map(|i| i + 4)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn find_key(body: &str, key: &str) -> Option<usize> {
    let quoted = format!("\"{key}\"");
    let mut from = 0;
    while let Some(i) = body[from..].find(key) {
        let at = from + i;
        from = at + key.len();
        let prev = body[..at].chars().last();
        let next_char = body[at + key.len()..].chars().next();
        if prev.is_some_and(is_ident) || next_char.is_some_and(is_ident) {
            continue;
        }
        let after = body[at + key.len()..].trim_start();
        if prev == Some('.') || (after.starts_with(':') && !after.starts_with("::")) {
            return Some(at);
        }
        if prev == Some('"') && body[at - 1..].starts_with(&quoted) && body[at + key.len() + 1..].trim_start().starts_with(':') {
            return Some(at - 1);
        }
    }
    None
}

/// A prompt source whose list a hook may replace (`prompts: [..]`); otherwise the run's own.
pub struct HookedPrompts {
    inner: Box<dyn PromptSource>,
    list: Arc<Mutex<Option<FixedPrompts>>>,
}

impl PromptSource for HookedPrompts {
    fn next_prompt(&mut self, rng: &mut ChaCha8Rng) -> anyhow::Result<String> {
        match self.list.lock().unwrap().as_mut() {
            Some(list) => list.next_prompt(rng),
            None => self.inner.next_prompt(rng),
        }
    }
}

/// What happened at an epoch boundary.
#[derive(Debug, Clone, Default)]
pub struct HookOutcome {
    /// The overrides applied (empty when none, or when the hook failed).
    pub applied: Overrides,
    /// Whether the hook asked to stop the run.
    pub stop: bool,
    /// The hook's error (`hooks.rhai:line:col: message`); the settings are unchanged.
    pub error: Option<String>,
}

/// Runs schedule hooks and applies what they return to the training settings (lr, guidance,
/// reward weights, prompt list), which stay in effect until a hook changes them again.
pub struct HookRunner {
    hooks: Option<ScriptHooks>,
    /// The reward whose components `weights` recombine, and the handle that sets them.
    reward: Arc<dyn Reward>,
    weights: Weights,
    prompts: Arc<Mutex<Option<FixedPrompts>>>,
    base_lr: f64,
    base_guidance: f64,
    /// Epochs this run (or this `train(n)`) is to reach, for decay schedules.
    pub epochs: usize,
}

impl HookRunner {
    /// A hook runner for training that will start from `config`; wraps its prompt source so hooks
    /// can replace the prompt list.
    pub fn new(
        hooks: Option<ScriptHooks>,
        (reward, weights): (Arc<dyn Reward>, Weights),
        config: &crate::ddpo::TrainConfig,
        prompts: Box<dyn PromptSource>,
    ) -> (Self, Box<dyn PromptSource>) {
        let list = Arc::new(Mutex::new(None));
        let wrapped = Box::new(HookedPrompts { inner: prompts, list: list.clone() });
        let (base_lr, base_guidance) = (config.optimizer.lr, config.sampler.guidance);
        let s = Self { hooks, reward, weights, prompts: list, base_lr, base_guidance, epochs: 0 };
        (s, wrapped)
    }

    /// Whether a hooks script is loaded.
    pub fn has_hooks(&self) -> bool {
        self.hooks.is_some()
    }

    /// The reward-component weights in effect (empty: the reward's own total counts).
    pub fn weights(&self) -> BTreeMap<String, f64> {
        self.weights.read().unwrap().clone()
    }

    /// `ctx` for a hook: the run context, the current settings and (after an epoch) its metrics.
    pub fn context(&self, config: &TrainConfig, run: &Context, metrics: Option<&serde_json::Value>) -> Map {
        let mut m = run.to_map();
        m.insert("epochs".into(), (self.epochs as INT).into());
        m.insert("lr".into(), Dynamic::from_float(config.optimizer.lr));
        m.insert("guidance".into(), Dynamic::from_float(config.sampler.guidance));
        m.insert("base_lr".into(), Dynamic::from_float(self.base_lr));
        m.insert("base_guidance".into(), Dynamic::from_float(self.base_guidance));
        let weights: Map = self.weights().into_iter().map(|(k, v)| (k.into(), Dynamic::from_float(v))).collect();
        m.insert("weights".into(), weights.into());
        if let Some(metrics) = metrics {
            m.insert("metrics".into(), json_to_dynamic(metrics));
        }
        m
    }

    /// Runs `on_epoch_start` before the next epoch and applies what it returns to `config` (all
    /// or nothing); `family` is the policy the settings must suit.
    pub fn epoch_start(&mut self, config: &mut TrainConfig, family: &dyn Family, run: &Context) -> HookOutcome {
        let Some(hooks) = &self.hooks else { return HookOutcome::default() };
        let version = hooks.current.read().unwrap().clone();
        let ctx = self.context(config, run, None);
        let result = call_hook(&hooks.host, &version, ON_EPOCH_START, ctx.clone(), &START_KEYS).and_then(|o| {
            self.check(config, family, &o).map_err(|bad| bad.locate(&hooks.host, &version, ON_EPOCH_START, ctx))?;
            Ok(o)
        });
        match result {
            Ok(o) => {
                self.apply(config, &o);
                HookOutcome { stop: o.stop, applied: o, error: None }
            }
            Err(e) => HookOutcome { error: Some(e.to_string()), ..Default::default() },
        }
    }

    /// Runs `on_epoch_end` after an epoch whose `metrics.jsonl` record is `metrics`.
    pub fn epoch_end(&mut self, config: &TrainConfig, run: &Context, metrics: &serde_json::Value) -> HookOutcome {
        let Some(hooks) = &self.hooks else { return HookOutcome::default() };
        let ctx = self.context(config, run, Some(metrics));
        match hooks.on_epoch_end(ctx) {
            Ok(stop) => HookOutcome { stop, ..Default::default() },
            Err(e) => HookOutcome { error: Some(e.to_string()), ..Default::default() },
        }
    }

    /// Checks overrides against the settings, the policy and the reward (guidance range,
    /// weighted components).
    fn check(&self, config: &TrainConfig, family: &dyn Family, o: &Overrides) -> Result<(), BadValue> {
        if let Some(g) = o.guidance {
            let sampler = crate::family::SamplerConfig { guidance: g, ..config.sampler };
            family.check_sampler(&sampler).map_err(|e| BadValue::new(Some("guidance"), format!("on_epoch_start(): {e}")))?;
        }
        if let Some(w) = o.weights.as_ref().filter(|w| !w.is_empty()) {
            let names = crate::reward::component_names(self.reward.as_ref())
                .map_err(|e| BadValue::new(Some("weights"), format!("on_epoch_start(): cannot list the reward's components: {e:#}")))?;
            if let Some(unknown) = w.keys().find(|k| !names.contains(*k)) {
                let have: Vec<&str> = names.iter().map(String::as_str).collect();
                return Err(BadValue::new(Some(unknown), format!(
                    "on_epoch_start(): `weights` names `{unknown}`, which {} does not return (its components: {})",
                    self.reward.name(),
                    if have.is_empty() { "none".into() } else { have.join(", ") }
                )));
            }
        }
        Ok(())
    }

    /// Applies checked overrides to `config` and the reward and prompt handles.
    fn apply(&mut self, config: &mut TrainConfig, o: &Overrides) {
        if let Some(lr) = o.lr {
            config.optimizer.lr = lr;
        }
        if let Some(g) = o.guidance {
            config.sampler.guidance = g;
        }
        if let Some(w) = &o.weights {
            *self.weights.write().unwrap() = w.clone();
        }
        if let Some(p) = &o.prompts {
            *self.prompts.lock().unwrap() = (!p.is_empty()).then(|| FixedPrompts(p.clone()));
        }
    }

    /// Re-applies the `"hooks"` records of a resumed run's `metrics.jsonl` (kept epochs only),
    /// so settings changed by hooks survive `--resume`.
    pub fn replay(&mut self, config: &mut TrainConfig, family: &dyn Family, records: &[serde_json::Value]) {
        for r in records {
            let o = Overrides::from_json(&r["hooks"]);
            if r["hooks"].is_object() && self.check(config, family, &o).is_ok() {
                self.apply(config, &o);
            }
        }
    }
}

/// A JSON value as a script value (numbers as floats, objects as maps).
fn json_to_dynamic(v: &serde_json::Value) -> Dynamic {
    match v {
        serde_json::Value::Null => Dynamic::UNIT,
        serde_json::Value::Bool(b) => (*b).into(),
        serde_json::Value::Number(n) => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN) as FLOAT),
        serde_json::Value::String(s) => s.clone().into(),
        serde_json::Value::Array(a) => a.iter().map(json_to_dynamic).collect::<Array>().into(),
        serde_json::Value::Object(o) => o.iter().map(|(k, v)| (k.as_str().into(), json_to_dynamic(v))).collect::<Map>().into(),
    }
}

impl Shared {
    /// Recombines `score`'s total from its components when hooks set reward weights.
    pub(crate) fn reweigh(&self, score: &mut crate::reward::Score) -> Result<(), crate::reward::weighted::MissingComponent> {
        crate::reward::weighted::reweigh(score, &self.weights.read().unwrap())
    }
}

/// The overrides `on_epoch_start` may return, documented (same order as [`START_KEYS`]).
const OVERRIDE_DOCS: [(&str, &str); 5] = [
    ("lr", "Learning rate, a positive number."),
    ("guidance", "Classifier-free guidance scale, a number >= 0."),
    ("weights", "`#{ component: weight, .. }`: the reward total becomes the weighted sum of these named components of the reward, a script or a built-in such as `compressibility` (`jpeg_kb`) (its own `total` and unweighted components are logged but do not count); every name must be a component the reward returns. `#{}` turns recombination off."),
    ("prompts", "An array of prompt strings drawn uniformly from the run's generator instead of the run's prompts; `[]` goes back to the run's prompts."),
    ("stop", "`true`: stop before this epoch (the run is checkpointed)."),
];

/// What hooks see as `ctx`, documented.
const CONTEXT_DOCS: [(&str, &str); 11] = [
    ("epoch", "The epoch about to run (in `on_epoch_end`: the epoch just finished), from 0."),
    ("step", "Optimiser steps taken so far in the run."),
    ("epochs", "The epoch count the run is to reach (`--epochs`; in the REPL, the end of the current `train(n)`)."),
    ("lr", "The learning rate in effect."),
    ("guidance", "The guidance scale in effect."),
    ("weights", "The reward weights in effect (a map; empty when none)."),
    ("base_lr", "The learning rate the run started with."),
    ("base_guidance", "The guidance scale the run started with."),
    ("reward_mean", "Mean reward of each finished epoch, oldest first (in `on_epoch_end`, including the one just finished)."),
    ("reward_std", "Standard deviation of the reward of each finished epoch."),
    ("metrics", "`on_epoch_end` only: the finished epoch's `metrics.jsonl` record (`reward_mean`, `reward_std`, `reward_min`, `reward_max`, `loss`, `approx_kl`, `clipfrac` (`clipfrac_high`, `clipfrac_low`), `ratio_by_step`, `lr`, `reward/<component>`, `eval/<name>` after an evaluation, ..)."),
];

/// The hooks section of `scripts/API.md`.
pub fn markdown() -> String {
    debug_assert!(OVERRIDE_DOCS.iter().map(|(k, _)| *k).eq(START_KEYS));
    let mut out = String::from(
        "\n## Schedule hooks (`hooks.rhai`)\n\n\
         A hooks script defines `fn on_epoch_start(ctx)`, `fn on_epoch_end(ctx)` or both. They run\n\
         at each epoch boundary of `ddpo train` (`--hooks FILE`, default `scripts/hooks.rhai`) and of\n\
         the REPL's `train(n)`. `on_epoch_start` may return nothing or a map of overrides; each stays\n\
         in effect until a later hook changes it, and each applied one is recorded in that epoch's\n\
         `metrics.jsonl` record (`\"hooks\": {..}`) and log line. `on_epoch_end` may `print` (to the\n\
         run log) and may return `#{ stop: true }` to end the run after the epoch (checkpointed). A\n\
         hook that throws or returns an unknown key, a wrong type or a bad number is reported as\n\
         `hooks.rhai:line:col: message` (at the key when it is written literally) and changes\n\
         nothing: the previous settings stay.\n\n\
         | override | meaning |\n|---|---|\n",
    );
    for (k, doc) in OVERRIDE_DOCS {
        out.push_str(&format!("| `{k}` | {doc} |\n"));
    }
    out.push_str("\n| `ctx` field | meaning |\n|---|---|\n");
    for (k, doc) in CONTEXT_DOCS {
        out.push_str(&format!("| `{k}` | {doc} |\n"));
    }
    out
}
