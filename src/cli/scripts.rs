//! The CLI side of scripts shared by `train` and `repl`: finding the default scripts in
//! `scripts/`, and the hooks' part of an epoch's log line.

use std::path::{Path, PathBuf};

use crate::script::HookOutcome;

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

/// The end of an epoch's log line: the overrides applied at its start, if any.
pub fn log_suffix(start: &HookOutcome) -> String {
    if start.applied.is_empty() {
        String::new()
    } else {
        format!("  hooks: {}", start.applied.summary())
    }
}
