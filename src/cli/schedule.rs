//! The CLI side of scripts shared by `train` and `repl`: finding the default scripts in
//! `scripts/`, and reporting schedule hooks (log lines, the `metrics.jsonl` fields).

use std::path::{Path, PathBuf};

use crate::script::{HookOutcome, Schedule, ScriptSet};

/// The default scripts (`scripts/reward.rhai`, `prompts.rhai`, `hooks.rhai` in the working
/// directory) for the flags left out, where they exist.
#[derive(Debug, Default)]
pub struct DefaultScripts {
    pub reward: Option<PathBuf>,
    pub prompts: Option<PathBuf>,
    pub hooks: Option<PathBuf>,
    /// What was looked for and not found, and the built-in used instead.
    missing: Vec<(&'static str, &'static str)>,
}

impl DefaultScripts {
    /// Looks for the default of each flag not given.
    pub fn find(reward: bool, prompts: bool, hooks: bool) -> Self {
        let mut d = Self::default();
        for (wanted, file, fallback, slot) in [
            (reward, "reward.rhai", "the built-in compressibility reward", &mut d.reward),
            (prompts, "prompts.rhai", "the built-in prompt list", &mut d.prompts),
            (hooks, "hooks.rhai", "no hooks", &mut d.hooks),
        ] {
            if !wanted {
                continue;
            }
            let path = Path::new("scripts").join(file);
            if path.is_file() {
                *slot = Some(path);
            } else {
                d.missing.push((file, fallback));
            }
        }
        d
    }

    /// Prints one note on stderr naming the defaults not found and what is used instead.
    pub fn note(&self) {
        if self.missing.is_empty() {
            return;
        }
        let files: Vec<String> = self.missing.iter().map(|(f, _)| format!("scripts/{f}")).collect();
        let used: Vec<&str> = self.missing.iter().map(|(_, u)| *u).collect();
        let here = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| ".".into());
        eprintln!("note: no {} in {here}: using {}", files.join(", "), used.join(", "));
    }
}

/// The records of a run's `metrics.jsonl`, oldest first.
pub fn metrics_records(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The line to print for a failed hook (its settings are unchanged).
pub fn error_line(o: &HookOutcome) -> Option<String> {
    o.error.as_ref().map(|e| format!("{e} (hook failed: the previous settings stay)"))
}

/// The extra fields of an epoch's `metrics.jsonl` record: script hashes, the overrides the
/// hooks applied at its start (`hooks`), a hook error, and the reward weights in effect.
pub fn record_extra(scripts: &ScriptSet, schedule: &Schedule, start: &HookOutcome) -> serde_json::Value {
    let mut extra = serde_json::json!({ "scripts": scripts.hashes() });
    if !start.applied.is_empty() {
        extra["hooks"] = start.applied.to_json();
    }
    if let Some(e) = &start.error {
        extra["hooks_error"] = e.clone().into();
    }
    let weights = schedule.weights();
    if !weights.is_empty() {
        extra["weights"] = serde_json::json!(weights);
    }
    extra
}

/// The end of an epoch's log line: the overrides applied at its start, if any.
pub fn log_suffix(start: &HookOutcome) -> String {
    if start.applied.is_empty() {
        String::new()
    } else {
        format!("  hooks: {}", start.applied.summary())
    }
}
