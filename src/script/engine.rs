//! The sandboxed Rhai engine: limits (operations, call depth, expression depth, data sizes and a
//! wall-clock deadline per call), `print`/`debug` routed to a log callback, `eval` disabled,
//! strict variables, and an `import` resolver that refuses anything outside the scripts folder.
//! Also turns Rhai errors into `file:line:col: message` [`ScriptError`]s written for the user.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::module_resolvers::FileModuleResolver;
use rhai::{Engine, EvalAltResult, ModuleResolver, ParseErrorType, Position};

/// Where script `print` and `debug` output goes: one line per call.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Resource limits of one script call.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Rhai operations per call (statements, expressions, loop iterations).
    pub max_operations: u64,
    /// Nested function calls.
    pub max_call_levels: usize,
    /// Expression nesting depth (global level, inside functions).
    pub max_expr_depth: usize,
    pub max_fn_expr_depth: usize,
    /// Characters in one string.
    pub max_string_size: usize,
    /// Elements in one array.
    pub max_array_size: usize,
    /// Entries in one object map.
    pub max_map_size: usize,
    /// Modules one script may import.
    pub max_modules: usize,
    /// Wall-clock time per call.
    pub time_limit: Duration,
    /// Pixels of all images one call may create (`resize`, `crop`, `to_gray`), so an untrusted
    /// script cannot exhaust memory before the deadline.
    pub max_image_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_operations: 10_000_000,
            max_call_levels: 32,
            max_expr_depth: 64,
            max_fn_expr_depth: 32,
            max_string_size: 64 * 1024,
            max_array_size: 100_000,
            max_map_size: 10_000,
            max_modules: 16,
            time_limit: Duration::from_secs(1),
            max_image_pixels: 16 * 1024 * 1024,
        }
    }
}

thread_local! {
    /// The deadline of the script call running on this thread, if any.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The operation count at which the deadline stopped the last call on this thread.
    static STOPPED_AT: Cell<u64> = const { Cell::new(0) };
    /// While a locator replays a call: stop at this operation count (where the deadline struck).
    static REPLAY_UNTIL: Cell<Option<u64>> = const { Cell::new(None) };
    /// While a locator replays a call: the last statement or expression reached (source, position).
    static LAST_STEP: RefCell<Option<(Option<String>, Position)>> = const { RefCell::new(None) };
    /// Image pixels the call running on this thread may still create.
    static PIXELS_LEFT: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// Whether `err` is a sandbox limit (which Rhai reports without a position).
pub(crate) fn is_limit(err: &EvalAltResult) -> bool {
    match err {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) | EvalAltResult::ErrorInModule(_, inner, _) => is_limit(inner),
        EvalAltResult::ErrorTooManyOperations(_)
        | EvalAltResult::ErrorTerminated(..)
        | EvalAltResult::ErrorStackOverflow(_)
        | EvalAltResult::ErrorDataTooLarge(..)
        | EvalAltResult::ErrorTooManyModules(_) => true,
        EvalAltResult::ErrorRuntime(v, _) => v.to_string().starts_with(IMAGE_LIMIT),
        _ => false,
    }
}

/// Replays a call that hit a limit (`err`) with `replay` (a call on a [`new_locator`] engine)
/// and returns the source and position of the last step it reached: where the limit struck.
/// Operation, depth and size limits recur at the same step; a deadline stop is replayed up to
/// the operation count at which it struck.
pub(crate) fn locate(err: &EvalAltResult, limits: &Limits, replay: impl FnOnce()) -> Option<(Option<String>, Position)> {
    let deadline = matches!(innermost(err), EvalAltResult::ErrorTerminated(..));
    REPLAY_UNTIL.with(|r| r.set(deadline.then(|| STOPPED_AT.with(|s| s.get()))));
    LAST_STEP.with(|l| l.borrow_mut().take());
    // The replay is slower (the step hook); if its deadline strikes first, the step it reached
    // is still inside the runaway code, and the error arrives within twice the time limit.
    within_limits(limits, replay);
    REPLAY_UNTIL.with(|r| r.set(None));
    LAST_STEP.with(|l| l.borrow_mut().take())
}

/// Replays a call that succeeded with `replay` (a call on a [`new_locator`] engine) and returns
/// the source and position of the last step it reached: the value it returned, typically, so
/// that a bad return value can be pointed at.
pub(crate) fn last_step(limits: &Limits, replay: impl FnOnce()) -> Option<(Option<String>, Position)> {
    REPLAY_UNTIL.with(|r| r.set(None));
    LAST_STEP.with(|l| l.borrow_mut().take());
    within_limits(limits, replay);
    LAST_STEP.with(|l| l.borrow_mut().take())
}

fn innermost(mut err: &EvalAltResult) -> &EvalAltResult {
    while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) | EvalAltResult::ErrorInModule(_, inner, _) = err {
        err = inner;
    }
    err
}

/// Runs `f` (one script call) on this thread with a deadline of `time_limit` from now and a
/// fresh image-pixel budget.
pub(crate) fn within_limits<T>(limits: &Limits, f: impl FnOnce() -> T) -> T {
    let previous = DEADLINE.with(|d| d.replace(Some(Instant::now() + limits.time_limit)));
    let pixels = PIXELS_LEFT.with(|p| p.replace(limits.max_image_pixels));
    let out = f();
    DEADLINE.with(|d| d.set(previous));
    PIXELS_LEFT.with(|p| p.set(pixels));
    out
}

/// Runs `f` (a host call bounded by timeouts of its own, e.g. a VLM request) off the clock: the
/// time it takes is added to the running call's deadline, so a reward waiting on the network is
/// not stopped as a runaway script.
pub(crate) fn off_the_clock<T>(f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let spent = start.elapsed();
    DEADLINE.with(|d| d.set(d.get().map(|t| t + spent)));
    out
}

/// Charges the creation of an image of `pixels` pixels to the running call's budget.
pub(crate) fn charge_pixels(pixels: u64) -> Result<(), Box<EvalAltResult>> {
    PIXELS_LEFT.with(|p| match p.get().checked_sub(pixels) {
        Some(left) => {
            p.set(left);
            Ok(())
        }
        None => Err(format!("{IMAGE_LIMIT}: the script created more image pixels than the limit per call").into()),
    })
}

/// The prefix of the image-budget error, recognised by [`script_error`].
const IMAGE_LIMIT: &str = "stopped: image memory limit";

/// The token an `on_progress` stop carries, recognised by [`script_error`].
const DEADLINE_TOKEN: &str = "ddpo: time limit";

/// A fresh engine with the sandbox applied. `name` labels log lines; `root` is the only folder
/// `import` may read from.
pub(crate) fn new_engine(name: &str, root: &Path, limits: &Limits, log: Log) -> Engine {
    sandboxed(name, root, limits, log, false)
}

/// A "locator": the sandboxed engine plus a debugger hook that records every step's position.
/// Rhai reports limit errors without a position, so a call that hits one is replayed once on
/// the locator (see [`locate`]) to find the line it stopped at; normal calls never pay for it.
pub(crate) fn new_locator(root: &Path, limits: &Limits) -> Engine {
    sandboxed("", root, limits, Arc::new(|_: &str| {}), true)
}

fn sandboxed(name: &str, root: &Path, limits: &Limits, log: Log, locator: bool) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_fn_expr_depth)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_max_modules(limits.max_modules)
        .set_strict_variables(true)
        .disable_symbol("eval");
    engine.on_progress(move |ops| {
        if locator {
            if REPLAY_UNTIL.with(|r| r.get()).is_some_and(|until| ops >= until) {
                return Some(DEADLINE_TOKEN.into());
            }
        }
        // Often enough that slow host calls (image operations) cannot overrun much.
        if ops % 16 != 0 {
            return None;
        }
        let late = DEADLINE.with(|d| d.get()).is_some_and(|t| Instant::now() > t);
        if late && !locator {
            STOPPED_AT.with(|s| s.set(ops));
        }
        late.then(|| DEADLINE_TOKEN.into())
    });
    if locator {
        #[allow(deprecated)] // "volatile", not deprecated
        engine.register_debugger(
            |_, dbg| dbg,
            |_, event, _, source, pos| {
                // Only steps: function-exit events point at the closing brace.
                if matches!(event, rhai::debugger::DebuggerEvent::Step) && !pos.is_none() {
                    LAST_STEP.with(|l| *l.borrow_mut() = Some((source.map(str::to_string), pos)));
                }
                Ok(rhai::debugger::DebuggerCommand::StepInto)
            },
        );
    }
    let (print_log, print_name) = (log.clone(), name.to_string());
    engine.on_print(move |s| print_log(&format!("[{print_name}] {s}")));
    let debug_name = name.to_string();
    engine.on_debug(move |s, src, pos| {
        let file = src.map(|s| format!("{s}.rhai")).unwrap_or_else(|| debug_name.clone());
        match (pos.line(), pos.position()) {
            (Some(l), Some(c)) => log(&format!("[{file}:{l}:{c}] {s}")),
            _ => log(&format!("[{file}] {s}")),
        }
    });
    engine.set_module_resolver(SandboxResolver::new(root));
    engine
}

/// `import` inside the scripts folder only: relative paths without `..`, which must still be
/// inside the folder after resolving symbolic links. Modules are read fresh on every compile
/// (no cache), so hot reload sees edited helpers.
pub(crate) struct SandboxResolver {
    root: PathBuf,
    inner: FileModuleResolver,
}

impl SandboxResolver {
    fn new(root: &Path) -> Self {
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let mut inner = FileModuleResolver::new_with_path(&root);
        inner.enable_cache(false);
        Self { root, inner }
    }

    /// The file `path` names, if it is allowed.
    fn check(&self, path: &str, pos: Position) -> Result<PathBuf, Box<EvalAltResult>> {
        let pos = if pos.is_none() { import_position(path) } else { pos };
        let refuse = |why: &str| -> Box<EvalAltResult> {
            EvalAltResult::ErrorRuntime(
                format!("import {path:?} refused: {why} (modules must be .rhai files inside {})", self.root.display()).into(),
                pos,
            )
            .into()
        };
        let p = Path::new(path);
        if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(refuse("absolute paths and '..' are not allowed"));
        }
        let file = self.inner.get_file_path(path, None);
        if let Ok(real) = file.canonicalize() {
            if !real.starts_with(&self.root) {
                return Err(refuse("it leads outside the scripts folder"));
            }
        }
        Ok(file)
    }
}

thread_local! {
    /// Set while compiling on this thread: the module files the compile resolved.
    static IMPORTS: RefCell<Option<Vec<PathBuf>>> = const { RefCell::new(None) };
    /// Set while compiling on this thread: the source being compiled (to place refused imports).
    static COMPILING: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs `f` (a compile of `source`) and returns the module files it imported, in order.
pub(crate) fn record_imports<T>(source: &str, f: impl FnOnce() -> T) -> (T, Vec<PathBuf>) {
    IMPORTS.with(|r| *r.borrow_mut() = Some(Vec::new()));
    COMPILING.with(|c| *c.borrow_mut() = source.to_string());
    let out = f();
    COMPILING.with(|c| c.borrow_mut().clear());
    let files = IMPORTS.with(|r| r.borrow_mut().take()).unwrap_or_default();
    (out, files)
}

/// Where the source being compiled says `import "path"`: Rhai resolves the imports of a
/// self-contained compile without positions.
fn import_position(path: &str) -> Position {
    let quoted = format!("{path:?}");
    COMPILING.with(|c| {
        c.borrow()
            .lines()
            .enumerate()
            .find_map(|(i, line)| {
                let col = line.len() - line.trim_start().len();
                (line[col..].starts_with("import") && line.contains(&quoted)).then(|| Position::new(i as u16 + 1, col as u16 + 1))
            })
            .unwrap_or(Position::NONE)
    })
}

impl ModuleResolver for SandboxResolver {
    fn resolve(&self, engine: &Engine, source: Option<&str>, path: &str, pos: Position) -> Result<Arc<rhai::Module>, Box<EvalAltResult>> {
        let file = self.check(path, pos)?;
        // The recorder is per thread: only the thread that compiles records.
        IMPORTS.with(|r| {
            if let Some(list) = r.borrow_mut().as_mut() {
                if !list.contains(&file) {
                    list.push(file.clone());
                }
            }
        });
        self.inner.resolve(engine, source, path, pos)
    }

    fn resolve_ast(&self, engine: &Engine, source: Option<&str>, path: &str, pos: Position) -> Option<Result<rhai::AST, Box<EvalAltResult>>> {
        if let Err(e) = self.check(path, pos) {
            return Some(Err(e));
        }
        self.inner.resolve_ast(engine, source, path, pos)
    }
}

/// A script problem, printed as `file:line:col: message` (or `file: message` without a position).
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptError {
    pub file: String,
    pub line: Option<usize>,
    pub col: Option<usize>,
    pub message: String,
}

impl ScriptError {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: file.into(), line: None, col: None, message: message.into() }
    }

    fn at(file: &str, pos: Position, message: String) -> Self {
        Self { file: file.to_string(), line: pos.line(), col: pos.position(), message }
    }
}

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.col) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ScriptError {}

/// Converts a Rhai error raised by script `file` (whose modules live in `root`) into a
/// [`ScriptError`] at the innermost position. `call` is the entry point that was called (e.g.
/// `reward`), named by limit errors; `located` is where a limit struck (from [`locate`]), since
/// Rhai gives limit errors no position.
pub(crate) fn script_error(
    file: &str,
    root: &Path,
    err: &EvalAltResult,
    limits: &Limits,
    call: Option<&str>,
    located: Option<(Option<String>, Position)>,
) -> ScriptError {
    let mut file = file.to_string();
    let mut err = err;
    let mut calls: Vec<String> = Vec::new();
    loop {
        match err {
            EvalAltResult::ErrorInModule(module, inner, _) => {
                file = module_file(root, module);
                err = inner;
            }
            EvalAltResult::ErrorInFunctionCall(name, source, inner, _) => {
                if !source.is_empty() {
                    file = module_file(root, source);
                }
                calls.push(format!("{name}()"));
                err = inner;
            }
            _ => break,
        }
    }
    let who = call.map(|c| format!("{c}()")).unwrap_or_else(|| "the script".into());
    let message = match err {
        EvalAltResult::ErrorTooManyOperations(_) => format!(
            "{who} exceeded the operation limit (max_operations = {}): an endless loop?",
            limits.max_operations
        ),
        EvalAltResult::ErrorTerminated(token, _) if token.clone().into_string().ok().as_deref() == Some(DEADLINE_TOKEN) => {
            format!("{who} exceeded the time limit (time_limit = {} ms per call)", limits.time_limit.as_millis())
        }
        EvalAltResult::ErrorStackOverflow(_) => {
            format!("{who} exceeded the call depth limit (max_call_levels = {}): endless recursion?", limits.max_call_levels)
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => {
            let (thing, limit, n) = if what.contains("string") {
                ("a string", "max_string_size", limits.max_string_size)
            } else if what.contains("array") {
                ("an array", "max_array_size", limits.max_array_size)
            } else {
                ("an object map", "max_map_size", limits.max_map_size)
            };
            format!("{who} exceeded the size limit of {thing} ({limit} = {n})")
        }
        EvalAltResult::ErrorTooManyModules(_) => format!("{who} exceeded the module limit (max_modules = {})", limits.max_modules),
        EvalAltResult::ErrorParsing(ParseErrorType::ExprTooDeep, _) => format!(
            "expression nested deeper than the limit (max_expr_depth = {}, max_fn_expr_depth = {} inside functions)",
            limits.max_expr_depth, limits.max_fn_expr_depth
        ),
        EvalAltResult::ErrorSystem(msg, inner) => format!("{msg}: {inner}"),
        EvalAltResult::ErrorRuntime(value, _) if value.to_string().starts_with(IMAGE_LIMIT) => format!(
            "{who} exceeded the image memory limit (max_image_pixels = {} created per call)",
            limits.max_image_pixels
        ),
        EvalAltResult::ErrorRuntime(value, _) => value.to_string(),
        other => {
            let text = other.to_string();
            let suffix = format!(" ({})", other.position());
            text.strip_suffix(&suffix).unwrap_or(&text).to_string()
        }
    };
    let message = if calls.is_empty() { message } else { format!("{message} (in {})", calls.join(" -> ")) };
    let mut pos = err.position();
    if pos.is_none() {
        if let Some((source, at)) = located {
            if let Some(src) = source.filter(|s| !s.is_empty()) {
                file = module_file(root, &src);
            }
            pos = at;
        }
    }
    ScriptError::at(&file, pos, message)
}

/// A script value's type as scripts call it (`int`, `float`, ..).
pub(crate) fn type_name(v: &rhai::Dynamic) -> &'static str {
    match v.type_name() {
        "i64" | "i32" => "int",
        "f64" | "f32" => "float",
        "string" | "ImmutableString" => "string",
        other => other.rsplit("::").next().unwrap_or(other),
    }
}

/// The display name of module `name` (as written in `import`).
fn module_file(root: &Path, name: &str) -> String {
    let p = Path::new(name);
    let p = if p.extension().is_some() { p.to_path_buf() } else { p.with_extension("rhai") };
    root.join(p).display().to_string()
}
