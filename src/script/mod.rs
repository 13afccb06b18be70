//! The Rhai scripting host: prompts and rewards written as `.rhai` scripts, run sandboxed (shared
//! scripts are untrusted) and hot-reloaded between epochs. This is the only module that uses rhai.
//!
//! - [`engine`]: the sandbox (limits, deadline, `import` confined to the scripts folder) and
//!   `file:line:col: message` errors.
//! - [`api`]: the host API scripts see (the reward primitives of [`crate::reward::registry`] and
//!   the script-only functions), registered and documented in one place (`scripts/API.md`).
//! - [`reward`]: [`ScriptReward`], a [`crate::reward::Reward`] backed by `fn reward(img, prompt, meta)`.
//! - [`prompts`]: [`ScriptPrompts`], a [`crate::ddpo::PromptSource`] backed by `fn prompt()`.
//! - [`hooks`]: [`ScriptHooks`] (`on_epoch_start` / `on_epoch_end`) and the [`HookRunner`] that
//!   applies their overrides (lr, guidance, reward weights, prompts, early stop) to a trainer.
//! - [`repl`]: the Rhai side of `ddpo repl` (REPL functions over a [`repl::ReplHost`]).
//! - [`set`]: [`ScriptSet`], the scripts of a run: loading, dry runs, hot reload, saved versions,
//!   and [`check_file`] / [`check_files`] for `ddpo check`.
//! - [`entry`]: the entry points scripts define, and near misses of them for `ddpo check`.

pub mod api;
pub mod engine;
pub mod entry;
pub mod experiment;
pub mod hooks;
pub mod prompts;
pub mod repl;
pub mod reward;
pub mod set;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rhai::{ASTNode, Dynamic, Engine, Expr, Scope, Stmt, AST};

use crate::reward::registry::{self, Needs};

pub use api::{Context, Image};
pub use engine::{Limits, Log, ScriptError};
pub use hooks::{HookOutcome, HookRunner, Overrides, ScriptHooks};
pub use prompts::ScriptPrompts;
pub use reward::ScriptReward;
pub use set::{check_file, check_files, check_files_with, Kind, Reload, ReloadOutcome, ScriptSet};

/// `scripts/API.md`: the host API, the schedule hooks and the REPL functions, generated from
/// their registration.
pub fn api_md() -> String {
    format!("{}{}{}", api::markdown(), hooks::markdown(), repl::markdown())
}

/// A stable 64-bit FNV-1a "content hash" of a script and the modules it imports, as 16 hex digits.
pub fn content_hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3); // separator
        }
        for b in part.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// State shared by the scripts of one run: the read-only context and the `meta` that prompt
/// scripts attach to prompts (handed to the reward of the same prompt).
#[derive(Clone, Default)]
pub(crate) struct Shared {
    pub context: Arc<RwLock<Context>>,
    pub meta: Arc<Mutex<HashMap<String, rhai::Map>>>,
    /// Reward-component weights set by hooks (empty: the reward's own total counts).
    pub weights: crate::reward::Weights,
    /// The CLIP and aesthetic models behind `clip_similarity` and `aesthetic`.
    pub models: crate::reward::models::LazyModels,
}

/// One compiled version of a script file.
pub struct Version {
    /// Content hash of the source and its imported modules.
    pub hash: String,
    pub source: String,
    /// Imported module files and their sources, as compiled.
    pub imports: Vec<(PathBuf, String)>,
    /// Names of the functions, methods and properties the script and its modules call.
    pub calls: BTreeSet<String>,
    ast: AST,
}

impl Version {
    /// The learned models the reward primitives this version calls need.
    pub fn needs(&self) -> Needs {
        registry::needs(self.calls.iter().map(String::as_str))
    }

    /// Whether the script (or a module it imports) calls a learned primitive, so its batches
    /// are worth embedding up front.
    pub fn uses_models(&self) -> bool {
        self.needs() > Needs::Nothing
    }

    /// Whether the script (or a module it imports) asks the VLM, so its batches are worth
    /// scoring on parallel threads.
    pub fn uses_vlm(&self) -> bool {
        registry::uses_vlm(self.calls.iter().map(String::as_str))
    }
}

/// Adds the names of the functions, methods and properties `ast` calls (also inside its
/// functions) to `into`. Calls through function pointers (`Fn("name")`) are not seen.
fn called_names(ast: &AST, into: &mut BTreeSet<String>) {
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            // A call whose value is a statement's (a function's last line) is a `Stmt::FnCall`.
            Some(ASTNode::Expr(Expr::FnCall(f, _) | Expr::MethodCall(f, _)) | ASTNode::Stmt(Stmt::FnCall(f, _))) => {
                into.insert(f.name.to_string());
            }
            Some(ASTNode::Expr(Expr::Property(p, _))) => {
                into.insert(p.2.to_string());
            }
            _ => {}
        }
        true
    });
}

/// A script file with its sandboxed engines (its folder is the only one it may import from).
/// Versions (compiled ASTs) are shared behind `Arc`s; engines are not: each thread calling the
/// script at the same time (each reward worker) checks out an engine of its own from a pool.
pub(crate) struct Host {
    /// The path as the user gave it; errors start with it.
    pub display: String,
    pub path: PathBuf,
    pub root: PathBuf,
    pub limits: Limits,
    /// Compiles versions.
    engine: Engine,
    /// Idle engines for calls, built on demand: at most one per thread calling concurrently.
    pool: Mutex<Vec<Engine>>,
    /// Builds one more sandboxed engine with the host API (for the pool).
    build: Box<dyn Fn() -> Engine + Send + Sync>,
    /// The same sandbox with a step recorder, to find where a limit struck.
    locator: Engine,
}

impl Host {
    pub fn new(path: &Path, limits: &Limits, shared: &Shared, log: Log) -> Self {
        let root = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (dir, sandbox, context, models) = (root.clone(), limits.clone(), shared.context.clone(), shared.models.clone());
        let build = Box::new(move || {
            let mut engine = engine::new_engine(&name, &dir, &sandbox, log.clone());
            api::register(&mut engine, context.clone(), models.clone());
            engine
        });
        let mut locator = engine::new_locator(&root, limits);
        api::register(&mut locator, shared.context.clone(), shared.models.clone());
        Self {
            display: path.display().to_string(),
            path: path.to_path_buf(),
            root,
            limits: limits.clone(),
            engine: build(),
            pool: Mutex::new(Vec::new()),
            build,
            locator,
        }
    }

    /// The file name, e.g. `reward.rhai`.
    pub fn file_name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| self.display.clone())
    }

    fn read(&self, path: &Path) -> Result<String, ScriptError> {
        std::fs::read_to_string(path).map_err(|e| ScriptError::new(path.display().to_string(), format!("cannot read the script: {e}")))
    }

    /// The content hash the file and `previous`'s imports have on disk now.
    pub fn current_hash(&self, previous: &Version) -> Result<String, ScriptError> {
        let mut texts = vec![self.read(&self.path)?];
        for (p, _) in &previous.imports {
            texts.push(std::fs::read_to_string(p).unwrap_or_else(|_| "\0missing".into()));
        }
        Ok(content_hash(&texts.iter().map(String::as_str).collect::<Vec<_>>()))
    }

    /// Reads and compiles the file now on disk, resolving its imports.
    pub fn compile(&self) -> Result<Version, ScriptError> {
        let source = self.read(&self.path)?;
        let (ast, files) = engine::record_imports(&source, || {
            engine::within_limits(&self.limits, || self.engine.compile_into_self_contained(&Scope::new(), &source))
        });
        let ast = ast.map_err(|e| engine::script_error(&self.display, &self.root, &e, &self.limits, None, None))?;
        let imports: Vec<(PathBuf, String)> =
            files.into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap_or_default())).collect();
        let mut calls = BTreeSet::new();
        called_names(&ast, &mut calls);
        for (path, text) in &imports {
            // A plain compile: the module's own imports are listed in `imports` already.
            let module = self.engine.compile(text).map_err(|e| {
                engine::script_error(&path.display().to_string(), &self.root, &e.into(), &self.limits, None, None)
            })?;
            called_names(&module, &mut calls);
        }
        let mut texts = vec![source.as_str()];
        texts.extend(imports.iter().map(|(_, s)| s.as_str()));
        Ok(Version { hash: content_hash(&texts), source, imports, calls, ast })
    }

    /// Calls script function `name` of `version` under the limits. A call stopped by a limit is
    /// replayed on the locator to name the line it stopped at.
    pub fn call(&self, version: &Version, name: &str, args: Vec<Dynamic>) -> Result<Dynamic, ScriptError> {
        let replay_args = args.clone();
        let engine = self.pool.lock().unwrap().pop().unwrap_or_else(|| (self.build)());
        let result = engine::within_limits(&self.limits, || engine.call_fn::<Dynamic>(&mut Scope::new(), &version.ast, name, args));
        self.pool.lock().unwrap().push(engine);
        let err = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let located = engine::is_limit(&err).then(|| {
            engine::locate(&err, &self.limits, || {
                let _ = self.locator.call_fn::<Dynamic>(&mut Scope::new(), &version.ast, name, replay_args);
            })
        });
        Err(engine::script_error(&self.display, &self.root, &err, &self.limits, Some(name), located.flatten()))
    }

    /// The line of the last step a successful call of `name` reached in the script itself (not
    /// in a module), found by replaying it on the locator (whose `print` goes nowhere).
    pub fn last_line(&self, version: &Version, name: &str, args: Vec<Dynamic>) -> Option<usize> {
        let (source, pos) = engine::last_step(&self.limits, || {
            let _ = self.locator.call_fn::<Dynamic>(&mut Scope::new(), &version.ast, name, args);
        })?;
        source.filter(|s| !s.is_empty()).is_none().then(|| pos.line()).flatten()
    }

    /// Whether `version` defines `fn name` with `params` parameters.
    pub fn defines(version: &Version, name: &str, params: usize) -> bool {
        version.ast.iter_functions().any(|f| f.name == name && f.params.len() == params)
    }
}
