//! [`ScriptSet`]: the scripts of a training run. Loads reward, prompt and hooks scripts
//! (compile + dry run), reloads the ones whose content hash changed between epochs (keeping the previous version
//! when the new one fails), and saves every version used into the run folder. Also
//! [`check_file`], the engine of `ddpo check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Context, Host, Limits, Log, ScriptError, ScriptHooks, ScriptPrompts, ScriptReward, Shared, Version};

/// What a script is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Defines `fn reward(img, prompt, meta)`.
    Reward,
    /// Defines `fn prompt()`.
    Prompts,
    /// Defines `fn on_epoch_start(ctx)` and/or `fn on_epoch_end(ctx)`.
    Hooks,
}

/// The result of reloading one changed script.
#[derive(Debug, Clone, PartialEq)]
pub enum ReloadOutcome {
    /// The new version compiled and passed its dry run; it is in use now.
    Reloaded { old: String, new: String },
    /// The new version failed; the previous one (`hash`) stays in use.
    Kept { hash: String, error: String },
}

/// One changed script found by [`ScriptSet::reload`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reload {
    /// The file name, e.g. `reward.rhai`.
    pub file: String,
    pub outcome: ReloadOutcome,
}

impl std::fmt::Display for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            ReloadOutcome::Reloaded { new, .. } => write!(f, "reloaded {} ({})", self.file, &new[..8]),
            ReloadOutcome::Kept { hash, error } => write!(f, "kept {} ({}): the new version failed: {error}", self.file, &hash[..8]),
        }
    }
}

struct Entry {
    kind: Kind,
    host: Arc<Host>,
    current: Arc<RwLock<Arc<Version>>>,
}

/// The scripts of a run, sharing one context and prompt-meta registry.
pub struct ScriptSet {
    limits: Limits,
    log: Log,
    shared: Shared,
    entries: Vec<Entry>,
}

/// Images and captions reward scripts are dry-run on.
fn dry_run_batch() -> (Vec<image::RgbImage>, Vec<String>) {
    crate::world::ShapesWorld::default().batch(0, 4).into_iter().map(|s| (s.image, s.caption)).unzip()
}

impl ScriptSet {
    pub fn new(limits: Limits, log: Log) -> Self {
        Self { limits, log, shared: Shared::default(), entries: Vec::new() }
    }

    /// Uses `models` for `clip_similarity` / `aesthetic` (instead of the shipped defaults);
    /// call before loading scripts.
    pub fn with_models(mut self, models: crate::reward::models::LazyModels) -> Self {
        self.shared.models = models;
        self
    }

    /// Loads a reward script (compiled and dry-run on a few shapes-world images).
    pub fn load_reward(&mut self, path: &Path) -> anyhow::Result<ScriptReward> {
        let (host, current) = self.load(path, Kind::Reward)?;
        Ok(ScriptReward { name: host.file_name(), host, current, shared: self.shared.clone() })
    }

    /// Loads a prompt script (compiled and dry-run by drawing a few prompts).
    pub fn load_prompts(&mut self, path: &Path) -> anyhow::Result<ScriptPrompts> {
        let (host, current) = self.load(path, Kind::Prompts)?;
        Ok(ScriptPrompts { host, current, shared: self.shared.clone() })
    }

    /// Loads a hooks script (compiled; its entry points are checked, not called).
    pub fn load_hooks(&mut self, path: &Path) -> anyhow::Result<ScriptHooks> {
        let (host, current) = self.load(path, Kind::Hooks)?;
        Ok(ScriptHooks { host, current })
    }

    fn load(&mut self, path: &Path, kind: Kind) -> anyhow::Result<(Arc<Host>, Arc<RwLock<Arc<Version>>>)> {
        let host = Arc::new(Host::new(path, &self.limits, &self.shared, self.log.clone()));
        let version = host.compile()?;
        dry_run(&host, &self.shared, &version, kind)?;
        let current = Arc::new(RwLock::new(Arc::new(version)));
        self.entries.push(Entry { kind, host: host.clone(), current: current.clone() });
        Ok((host, current))
    }

    /// Whether no script is loaded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets what `context()` returns.
    pub fn set_context(&self, context: Context) {
        // A new epoch: its own VLM budget.
        self.shared.models.begin_epoch();
        *self.shared.context.write().unwrap() = context;
    }

    /// Re-reads every script; each one whose content hash changed is compiled, dry-run and swapped
    /// in, or else the previous version is kept. Returns what changed (nothing when nothing did).
    pub fn reload(&mut self) -> Vec<Reload> {
        let mut out = Vec::new();
        for e in &self.entries {
            let old = e.current.read().unwrap().clone();
            let file = e.host.file_name();
            let changed = match e.host.current_hash(&old) {
                Ok(h) => h != old.hash,
                Err(err) => {
                    out.push(Reload { file, outcome: ReloadOutcome::Kept { hash: old.hash.clone(), error: err.to_string() } });
                    continue;
                }
            };
            if !changed {
                continue;
            }
            let fresh = e.host.compile().map_err(anyhow::Error::from).and_then(|v| dry_run(&e.host, &self.shared, &v, e.kind).map(|_| v));
            let outcome = match fresh {
                Ok(v) if v.hash == old.hash => continue, // e.g. an edit undone before the reload
                Ok(v) => {
                    let new = v.hash.clone();
                    *e.current.write().unwrap() = Arc::new(v);
                    ReloadOutcome::Reloaded { old: old.hash.clone(), new }
                }
                Err(err) => ReloadOutcome::Kept { hash: old.hash.clone(), error: format!("{err:#}") },
            };
            out.push(Reload { file, outcome });
        }
        out
    }

    /// File name -> content hash of each script in use.
    pub fn hashes(&self) -> BTreeMap<String, String> {
        self.entries.iter().map(|e| (e.host.file_name(), e.current.read().unwrap().hash.clone())).collect()
    }

    /// Each script in use: its kind, its path and the version compiled from it (source and
    /// imported modules), e.g. for a data-parallel run's rank 0 to send to the others.
    pub fn versions(&self) -> Vec<(Kind, PathBuf, Arc<Version>)> {
        self.entries.iter().map(|e| (e.kind, e.host.path.clone(), e.current.read().unwrap().clone())).collect()
    }

    /// Writes each version in use (and the modules it imports) as `dir/<stem>.<hash>.rhai`,
    /// once per version.
    pub fn save_versions(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for e in &self.entries {
            let v = e.current.read().unwrap().clone();
            save_once(dir, &e.host.path, &v.hash, &v.source)?;
            for (p, text) in &v.imports {
                save_once(dir, p, &super::content_hash(&[text]), text)?;
            }
        }
        Ok(())
    }
}

fn save_once(dir: &Path, path: &Path, hash: &str, text: &str) -> anyhow::Result<()> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "script".into());
    let file = dir.join(format!("{stem}.{hash}.rhai"));
    if !file.exists() {
        std::fs::write(&file, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
    }
    Ok(())
}

/// Runs a freshly compiled version on sample inputs; returns a one-line summary.
fn dry_run(host: &Host, shared: &Shared, version: &Version, kind: Kind) -> anyhow::Result<String> {
    match kind {
        Kind::Reward => {
            anyhow::ensure!(
                Host::defines(version, "reward", 3),
                ScriptError::new(&host.display, "a reward script must define `fn reward(img, prompt, meta)`")
            );
            let (images, captions) = dry_run_batch();
            if version.uses_models() {
                // Load the models and embed the batch before the calls run under the deadline.
                shared.models.get()?.prefetch(&images.iter().collect::<Vec<_>>())?;
            }
            let t = std::time::Instant::now();
            let mut shown = Vec::new();
            for (i, (img, caption)) in images.iter().zip(&captions).enumerate() {
                let s = ScriptReward::score_one(host, shared, version, img, caption, i)?;
                let parts: Vec<String> = s.components.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                shown.push(if parts.is_empty() { format!("{:.4}", s.total) } else { format!("{:.4} ({})", s.total, parts.join(", ")) });
            }
            let per_call = t.elapsed().as_secs_f64() * 1e3 / images.len() as f64;
            Ok(format!("reward, {} shapes-world images: {}; {per_call:.2} ms per call", images.len(), shown.join(" ")))
        }
        Kind::Prompts => {
            anyhow::ensure!(
                Host::defines(version, "prompt", 0),
                ScriptError::new(&host.display, "a prompt script must define `fn prompt()`")
            );
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            let t = std::time::Instant::now();
            let drawn = (0..4).map(|_| ScriptPrompts::draw(host, shared, version, &mut rng)).collect::<Result<Vec<_>, _>>()?;
            let per_call = t.elapsed().as_secs_f64() * 1e3 / drawn.len() as f64;
            Ok(format!("prompts: {}; {per_call:.2} ms per call", drawn.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")))
        }
        // Hooks change training settings and may print: loading and reloading only checks
        // their entry points; `ddpo check` also calls them (see `check_hooks`).
        Kind::Hooks => {
            super::hooks::check_defines(host, version)?;
            let defined: Vec<&str> =
                [super::hooks::ON_EPOCH_START, super::hooks::ON_EPOCH_END].into_iter().filter(|f| Host::defines(version, f, 1)).collect();
            Ok(format!("hooks: defines {}", defined.join(", ")))
        }
    }
}

/// `ddpo check` on a hooks script: calls each hook once with the context of a run's first epoch
/// (and, for `on_epoch_end`, a made-up metrics record) and shows what it returned.
fn check_hooks(host: &Host, version: &Version) -> anyhow::Result<String> {
    use super::hooks::{call_hook, ON_EPOCH_END, ON_EPOCH_START, START_KEYS};
    let defines = dry_run(host, &Shared::default(), version, Kind::Hooks)?;
    let mut ctx = Context::default().to_map();
    for (k, v) in [("epochs", 20.into()), ("lr", 3e-4.into()), ("guidance", 5.0.into()), ("base_lr", 3e-4.into()), ("base_guidance", 5.0.into())] {
        ctx.insert(k.into(), v);
    }
    ctx.insert("weights".into(), rhai::Map::new().into());
    let t = std::time::Instant::now();
    let start = call_hook(host, version, ON_EPOCH_START, ctx.clone(), &START_KEYS)?;
    let mut metrics = rhai::Map::new();
    for k in ["reward_mean", "reward_std", "reward_min", "reward_max", "loss", "approx_kl", "clipfrac"] {
        metrics.insert(k.into(), 0.0.into());
    }
    ctx.insert("metrics".into(), metrics.into());
    let end = call_hook(host, version, ON_EPOCH_END, ctx, &["stop"])?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let shown = |o: &super::Overrides| if o.is_empty() { "nothing".to_string() } else { o.summary() };
    Ok(format!("{defines}; at epoch 0 on_epoch_start returns {}, on_epoch_end {}; {ms:.2} ms", shown(&start), shown(&end)))
}

/// Compiles `path` and dry-runs it as what it defines (`fn reward`, `fn prompt` or hooks); a
/// file defining none of them passes as a module unless it defines a near miss of one (see
/// [`super::entry`]). Returns a one-line summary, or the error as `file:line:col: message`.
pub fn check_file(path: &Path, limits: &Limits, log: Log) -> anyhow::Result<String> {
    check_files(&[path.to_path_buf()], limits, log).pop().context("no check result")?
}

/// [`check_file`] on each of `paths`, except that a file another of them imports is a module on
/// purpose: near misses of entry points in it are not errors. One result per path, in order.
pub fn check_files(paths: &[PathBuf], limits: &Limits, log: Log) -> Vec<anyhow::Result<String>> {
    check_files_with(paths, limits, log, crate::reward::models::LazyModels::default())
}

/// [`check_files`] with `models` (e.g. a `--vlm` endpoint) behind the reward primitives.
pub fn check_files_with(paths: &[PathBuf], limits: &Limits, log: Log, models: crate::reward::models::LazyModels) -> Vec<anyhow::Result<String>> {
    let shared = Shared { models, ..Shared::default() };
    let compiled: Vec<_> = paths
        .iter()
        .map(|p| {
            let host = Host::new(p, limits, &shared, log.clone());
            host.compile().map(|v| (host, v))
        })
        .collect();
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let importers = |path: &Path| -> Vec<String> {
        let path = canonical(path);
        let by = compiled.iter().flatten().filter(|(_, v)| v.imports.iter().any(|(m, _)| canonical(m) == path));
        by.map(|(h, _)| h.file_name()).collect()
    };
    compiled
        .iter()
        .zip(paths)
        .map(|(c, path)| {
            let (host, version) = c.as_ref().map_err(|e| anyhow::Error::from(e.clone()))?;
            check_version(host, &shared, version, &importers(path))
        })
        .collect()
}

/// `ddpo check` of one compiled file; `importers` are the checked files that import it.
fn check_version(host: &Host, shared: &Shared, version: &Version, importers: &[String]) -> anyhow::Result<String> {
    let summary = if Host::defines(version, "reward", 3) {
        dry_run(host, shared, version, Kind::Reward)?
    } else if Host::defines(version, "prompt", 0) {
        dry_run(host, shared, version, Kind::Prompts)?
    } else if [super::hooks::ON_EPOCH_START, super::hooks::ON_EPOCH_END].iter().any(|f| version.ast.iter_functions().any(|d| d.name == *f)) {
        check_hooks(host, version)?
    } else if !importers.is_empty() {
        return Ok(format!("module imported by {} (compiled)", importers.join(", ")));
    } else {
        "module (compiled; defines none of `fn reward(img, prompt, meta)`, `fn prompt()`, `fn on_epoch_start(ctx)`, `fn on_epoch_end(ctx)`)".into()
    };
    if importers.is_empty() {
        if let Some(e) = super::entry::near_miss(host, version) {
            return Err(e.into());
        }
    }
    Ok(summary)
}
