//! Experiment scripts (`ddpo experiment FILE.rhai`): a comparison declared as shared `ddpo train`
//! options and axes to cross, evaluated once in the sandbox into a plain [`ExperimentSpec`].
//! Every option is checked where it is declared (by the caller's [`Validator`], the command
//! line's own flag parser), so a bad script fails at load with `file:line:col`, before any run.
//!
//! ```rhai
//! let e = experiment("paper");            // runs go to experiments/paper/<run>/
//! e.set("epochs", 12);                    // a `ddpo train` option for every run
//! e.vary("algo", ["is", "sf", "rwr"]);    // an axis: each value crossed with the others
//! e.vary("reward", ["compressibility", "../examples/aesthetic.rhai"]);
//! e.seeds([0, 1]);                        // the table shows mean ± std over these
//! e.paired_eval(8, 4);                    // base vs finetuned on the same noise (prompts, per prompt)
//!                                         // (or e.paired_eval_on("unseen_prompts.rhai", 8, 4))
//! e                                       // the script's value is the experiment
//! ```
//!
//! An axis whose values are maps ties options together under one name, e.g. a task's reward
//! and prompts: `e.vary("task", [#{ name: "jpeg", reward: "compressibility" }, #{ name:
//! "alignment", reward: "../examples/clip_alignment.rhai", prompts: "..." }])`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rhai::{Array, Dynamic, EvalAltResult, Position, Scope};

use super::engine::{self, Limits, Log, ScriptError};

/// Checks one `ddpo train` option (its name without dashes) and value as text; `Err` says why.
pub type Validator = Arc<dyn Fn(&str, &str) -> Result<(), String> + Send + Sync>;

/// Options the experiment sets itself for each run.
const OWNED: &[(&str, &str)] = &[
    ("run-dir", "each run's folder is experiments/<name>/<run>/"),
    ("resume", "an interrupted run is resumed by rerunning the experiment"),
    ("seed", "declare the seeds with e.seeds([..])"),
];

/// One axis of an experiment: a name (an option, or a bundle's name) and its values, each a
/// label and the options it sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub name: String,
    pub values: Vec<AxisValue>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AxisValue {
    /// What the table and folder names show: the value, or a bundle's `name`.
    pub label: String,
    pub options: Vec<(String, String)>,
}

/// Base-versus-finetuned evaluation of each finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedEval {
    pub prompts: usize,
    pub per_prompt: usize,
    /// A prompt script to draw the prompts from instead of the run's own prompts (e.g. prompts
    /// whose shapes and colours training never saw).
    pub script: Option<PathBuf>,
}

/// What an experiment script declares.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExperimentSpec {
    pub name: String,
    /// The script, for messages and for resolving relative paths.
    pub file: PathBuf,
    /// Options every run gets, as (option, value) in declaration order.
    pub shared: Vec<(String, String)>,
    pub axes: Vec<Axis>,
    pub seeds: Vec<u64>,
    pub paired: Option<PairedEval>,
}

/// One run of an experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// Folder name: the axis values and the seed, e.g. `algo-is.reward-compressibility.seed-0`.
    pub name: String,
    /// The runs that differ only by seed share it.
    pub group: String,
    pub seed: u64,
    /// (axis, label) of each axis.
    pub labels: Vec<(String, String)>,
    /// Every option of the run (shared, then the axes', then the seed).
    pub options: Vec<(String, String)>,
}

impl RunSpec {
    /// This run's label on `axis` ("" when there is no such axis).
    pub fn label(&self, axis: &str) -> &str {
        self.labels.iter().find(|(a, _)| a == axis).map_or("", |(_, l)| l.as_str())
    }
}

impl ExperimentSpec {
    /// Every run: the axes crossed in declaration order (the last varying fastest), seeds last.
    pub fn runs(&self) -> Vec<RunSpec> {
        let mut combos: Vec<Vec<(&Axis, &AxisValue)>> = vec![Vec::new()];
        for axis in &self.axes {
            combos = combos.into_iter().flat_map(|c| axis.values.iter().map(move |v| [c.clone(), vec![(axis, v)]].concat())).collect();
        }
        let mut runs = Vec::new();
        for combo in combos {
            let group = combo.iter().map(|(a, v)| format!("{}-{}", a.name, file_label(&v.label))).collect::<Vec<_>>().join(".");
            for &seed in &self.seeds {
                let mut options = self.shared.clone();
                options.extend(combo.iter().flat_map(|(_, v)| v.options.iter().cloned()));
                options.push(("seed".into(), seed.to_string()));
                let name = if group.is_empty() { format!("seed-{seed}") } else { format!("{group}.seed-{seed}") };
                let labels = combo.iter().map(|(a, v)| (a.name.clone(), v.label.clone())).collect();
                runs.push(RunSpec { name, group: if group.is_empty() { "all".into() } else { group.clone() }, seed, labels, options });
            }
        }
        runs
    }
}

/// A label as a folder-name part: anything but letters, digits, `-` and `_` replaced.
fn file_label(label: &str) -> String {
    label.chars().map(|c| if c.is_ascii_alphanumeric() || "-_".contains(c) { c } else { '_' }).collect()
}

/// A value as the table shows it: a script path by its stem.
fn value_label(value: &str) -> String {
    if value.ends_with(".rhai") {
        return Path::new(value).file_stem().map_or(value.into(), |s| s.to_string_lossy().into_owned());
    }
    value.to_string()
}

/// The builder scripts hold (`experiment(name)` returns it); its methods check as they go.
#[derive(Clone)]
struct Builder {
    spec: Arc<Mutex<ExperimentSpec>>,
    validate: Validator,
    root: PathBuf,
}

type Fallible<T> = Result<T, Box<EvalAltResult>>;

fn fail<T>(message: String) -> Fallible<T> {
    Err(Box::new(EvalAltResult::ErrorRuntime(message.into(), Position::NONE)))
}

impl Builder {
    /// A script value as the option's text; paths of scripts and models (`.rhai`,
    /// `.safetensors`) resolved against the script's folder, so an experiment runs from anywhere.
    fn value_text(&self, option: &str, value: &Dynamic) -> Fallible<String> {
        let text = if let Some(b) = value.clone().try_cast::<bool>() {
            b.to_string()
        } else if value.is_int() || value.is_float() || value.is_string() {
            value.to_string()
        } else {
            return fail(format!("{option}: {value} ({}) is not a number, string or bool", value.type_name()));
        };
        let kind = if text.ends_with(".rhai") {
            "script"
        } else if text.ends_with(".safetensors") {
            "model"
        } else {
            return Ok(text);
        };
        let path = self.root.join(&text);
        match std::fs::canonicalize(&path) {
            Ok(p) => Ok(p.display().to_string()),
            Err(_) => fail(format!("{option}: no such {kind} {} (paths are relative to the experiment's folder)", path.display())),
        }
    }

    fn check(&self, option: &str, value: &Dynamic) -> Fallible<String> {
        if let Some((_, why)) = OWNED.iter().find(|(o, _)| *o == option) {
            return fail(format!("{option} is set by the experiment: {why}"));
        }
        let text = self.value_text(option, value)?;
        (self.validate)(option, &text).or_else(|why| fail(why))?;
        Ok(text)
    }

    fn declared(&self, option: &str) -> bool {
        let spec = self.spec.lock().unwrap();
        spec.shared.iter().any(|(o, _)| o == option)
            || spec.axes.iter().any(|a| a.name == option || a.values.iter().any(|v| v.options.iter().any(|(o, _)| o == option)))
    }

    /// One value of axis `axis`: a plain value of option `axis`, or a bundle (a map with a
    /// `name` and options).
    fn axis_value(&self, axis: &str, value: &Dynamic) -> Fallible<AxisValue> {
        let Some(map) = value.clone().try_cast::<rhai::Map>() else {
            let text = self.check(axis, value)?;
            return Ok(AxisValue { label: value_label(&text), options: vec![(axis.to_string(), text)] });
        };
        let Some(label) = map.get("name").and_then(|n| n.clone().into_string().ok()) else {
            return fail(format!("a value of the axis {axis} is a map without a `name` string"));
        };
        let mut options = Vec::new();
        for (option, v) in map.iter().filter(|(k, _)| k.as_str() != "name") {
            if self.declared(option) {
                return fail(format!("{option} is declared twice (in the axis {axis} and elsewhere)"));
            }
            options.push((option.to_string(), self.check(option, v)?));
        }
        Ok(AxisValue { label, options })
    }

    fn set(&mut self, option: &str, value: Dynamic) -> Fallible<()> {
        if self.declared(option) {
            return fail(format!("{option} is declared twice"));
        }
        let text = self.check(option, &value)?;
        self.spec.lock().unwrap().shared.push((option.to_string(), text));
        Ok(())
    }

    fn vary(&mut self, option: &str, values: Array) -> Fallible<()> {
        if values.is_empty() {
            return fail(format!("the axis {option} has no values"));
        }
        if self.declared(option) {
            return fail(format!("{option} is declared twice"));
        }
        let values = values.iter().map(|v| self.axis_value(option, v)).collect::<Fallible<Vec<_>>>()?;
        if let Some((_, dup)) = values.iter().enumerate().find(|(i, v)| values[..*i].iter().any(|w| w.label == v.label)) {
            return fail(format!("the axis {option} lists {} twice", dup.label));
        }
        self.spec.lock().unwrap().axes.push(Axis { name: option.to_string(), values });
        Ok(())
    }

    fn seeds(&mut self, seeds: Array) -> Fallible<()> {
        if seeds.is_empty() {
            return fail("seeds([..]) needs at least one seed".into());
        }
        let mut out: Vec<u64> = Vec::new();
        for s in seeds {
            let Some(n) = s.as_int().ok().filter(|n| *n >= 0) else { return fail(format!("seed {s} is not a non-negative integer")) };
            if out.contains(&(n as u64)) {
                return fail(format!("seed {n} is listed twice"));
            }
            out.push(n as u64);
        }
        self.spec.lock().unwrap().seeds = out;
        Ok(())
    }

    fn paired_eval(&mut self, prompts: i64, per_prompt: i64) -> Fallible<()> {
        if prompts < 1 || per_prompt < 1 {
            return fail(format!("paired_eval({prompts}, {per_prompt}): both must be at least 1"));
        }
        self.spec.lock().unwrap().paired = Some(PairedEval { prompts: prompts as usize, per_prompt: per_prompt as usize, script: None });
        Ok(())
    }

    fn paired_eval_on(&mut self, script: &str, prompts: i64, per_prompt: i64) -> Fallible<()> {
        if !script.ends_with(".rhai") {
            return fail(format!("paired_eval_on: {script} is not a prompt script (.rhai)"));
        }
        let path = self.value_text("paired_eval_on", &Dynamic::from(script.to_string()))?;
        self.paired_eval(prompts, per_prompt)?;
        if let Some(p) = self.spec.lock().unwrap().paired.as_mut() {
            p.script = Some(PathBuf::from(path));
        }
        Ok(())
    }
}

/// Evaluates the experiment script at `path` (sandboxed, under `limits`) into its spec.
pub fn load(path: &Path, limits: &Limits, log: Log, validate: Validator) -> anyhow::Result<ExperimentSpec> {
    let display = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| ScriptError::new(&display, format!("cannot read the experiment: {e}")))?;
    let root = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut engine = engine::new_engine(&name, &root, limits, log);
    let file = path.to_path_buf();
    let builder_root = root.clone();
    engine
        .register_type_with_name::<Builder>("Experiment")
        .register_fn("experiment", move |name: &str| -> Fallible<Builder> {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
                return fail(format!("experiment name {name:?} must be letters, digits, - and _ (it names the folder)"));
            }
            let spec = ExperimentSpec { name: name.to_string(), file: file.clone(), seeds: vec![0], ..Default::default() };
            Ok(Builder { spec: Arc::new(Mutex::new(spec)), validate: validate.clone(), root: builder_root.clone() })
        })
        .register_fn("set", Builder::set)
        .register_fn("vary", Builder::vary)
        .register_fn("seeds", Builder::seeds)
        .register_fn("paired_eval", Builder::paired_eval)
        .register_fn("paired_eval_on", Builder::paired_eval_on);
    let located = |e: &EvalAltResult| engine::script_error(&display, &root, e, limits, None, None);
    let ast = engine::within_limits(limits, || engine.compile(&source)).map_err(|e| located(&e.into()))?;
    let value = engine::within_limits(limits, || engine.eval_ast_with_scope::<Dynamic>(&mut Scope::new(), &ast)).map_err(|e| located(&e))?;
    let Some(builder) = value.try_cast::<Builder>() else {
        return Err(ScriptError::new(&display, "the script must end with the experiment (`let e = experiment(\"name\"); ...; e`)").into());
    };
    let spec = builder.spec.lock().unwrap().clone();
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(axes: &[(&str, &[&str])], seeds: &[u64]) -> ExperimentSpec {
        ExperimentSpec {
            name: "t".into(),
            shared: vec![("epochs".into(), "2".into())],
            axes: axes
                .iter()
                .map(|(o, v)| Axis { name: o.to_string(), values: v.iter().map(|s| AxisValue { label: value_label(s), options: vec![(o.to_string(), s.to_string())] }).collect() })
                .collect(),
            seeds: seeds.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn runs_cross_the_axes_with_seeds_last() {
        let runs = spec(&[("algo", &["is", "sf"]), ("reward", &["compressibility", "/x/aesthetic.rhai"])], &[0, 1]).runs();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names.len(), 8);
        assert_eq!(names[0], "algo-is.reward-compressibility.seed-0");
        assert_eq!(names[1], "algo-is.reward-compressibility.seed-1");
        assert_eq!(names[3], "algo-is.reward-aesthetic.seed-1");
        assert_eq!(names[7], "algo-sf.reward-aesthetic.seed-1");
        assert_eq!(runs[2].group, "algo-is.reward-aesthetic");
        assert_eq!(runs[2].label("reward"), "aesthetic");
        assert_eq!(runs[3].options, vec![("epochs".into(), "2".into()), ("algo".into(), "is".into()), ("reward".into(), "/x/aesthetic.rhai".into()), ("seed".into(), "1".into())]);
        assert_eq!(spec(&[], &[3]).runs()[0].name, "seed-3");
    }
}
