//! The entry points a script may define (`fn reward(img, prompt, meta)`, `fn prompt()`, the two
//! hooks) and, for `ddpo check`, near misses of them: a definition with an entry point's name
//! but the wrong parameters, or a name a typo away. Either would make a script that `ddpo train`
//! refuses (or, for a hook, silently never calls) pass as a module.

use std::sync::{Arc, Mutex};

use rhai::{Engine, Position, Token};

use super::hooks::{ON_EPOCH_END, ON_EPOCH_START};
use super::{Host, Kind, ScriptError, Version};

/// One entry point.
pub struct EntryPoint {
    pub name: &'static str,
    pub params: &'static [&'static str],
    pub kind: Kind,
    /// What the script calls it, e.g. `a reward`.
    pub what: &'static str,
}

pub const ENTRY_POINTS: [EntryPoint; 4] = [
    EntryPoint { name: "reward", params: &["img", "prompt", "meta"], kind: Kind::Reward, what: "a reward" },
    EntryPoint { name: "prompt", params: &[], kind: Kind::Prompts, what: "a prompt script's entry point" },
    EntryPoint { name: ON_EPOCH_START, params: &["ctx"], kind: Kind::Hooks, what: "a hook" },
    EntryPoint { name: ON_EPOCH_END, params: &["ctx"], kind: Kind::Hooks, what: "a hook" },
];

impl EntryPoint {
    fn signature(&self) -> String {
        format!("fn {}({})", self.name, self.params.join(", "))
    }

    fn defined_by(&self, version: &Version) -> bool {
        Host::defines(version, self.name, self.params.len())
    }
}

/// The first near miss in `version` (in source order), as `file:line:col: message` at its `fn`.
/// Only entry points the script could be meant to define count: those of the kinds it defines
/// (the other hook of a hooks script), or all when it defines none.
pub(crate) fn near_miss(host: &Host, version: &Version) -> Option<ScriptError> {
    let defined: Vec<Kind> = ENTRY_POINTS.iter().filter(|e| e.defined_by(version)).map(|e| e.kind).collect();
    let missing: Vec<&EntryPoint> =
        ENTRY_POINTS.iter().filter(|e| !e.defined_by(version) && (defined.is_empty() || defined.contains(&e.kind))).collect();
    let positions = definition_positions(&version.source);
    for f in version.ast.iter_functions() {
        let shown = format!("fn {}({})", f.name, f.params.join(", "));
        let message = missing.iter().find_map(|e| {
            if f.name == e.name {
                let n = f.params.len();
                Some(format!("{shown} takes {n} parameter{}; {} is {}", if n == 1 { "" } else { "s" }, e.what, e.signature()))
            } else {
                looks_like(f.name, e.name).then(|| format!("{shown} looks like a misspelt {}", e.signature()))
            }
        });
        if let Some(message) = message {
            let pos = positions.iter().find(|(name, _)| name == f.name).map_or(Position::NONE, |(_, p)| *p);
            return Some(ScriptError { file: host.display.clone(), line: pos.line(), col: pos.position(), message });
        }
    }
    None
}

/// Whether `name` is a likely misspelling of `entry`: equal up to case and underscores, or a
/// few edits away. One edit for short names (`reward`, `prompt`: two would reach unrelated
/// words), two for the long hook names.
fn looks_like(name: &str, entry: &str) -> bool {
    let norm = |s: &str| -> Vec<char> { s.chars().filter(|c| *c != '_').flat_map(char::to_lowercase).collect() };
    let (a, b) = (norm(name), norm(entry));
    let budget = if b.len() <= 6 { 1 } else { 2 };
    name != entry && edit_distance(&a, &b) <= budget
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbours each cost one.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for j in 0..=b.len() {
        d[0][j] = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The name and position of the `fn` keyword of each function defined in `source`, read off
/// Rhai's own tokenizer (the AST keeps no position for definitions).
fn definition_positions(source: &str) -> Vec<(String, Position)> {
    let found: Arc<Mutex<Vec<(String, Position)>>> = Arc::default();
    let pending: Arc<Mutex<Option<Position>>> = Arc::default();
    let mut engine = Engine::new_raw();
    let record = found.clone();
    #[allow(deprecated)] // "volatile", not deprecated
    engine.on_parse_token(move |token, pos, _| {
        let mut fn_at = pending.lock().unwrap();
        match (&token, fn_at.take()) {
            (Token::Fn, _) => *fn_at = Some(pos),
            (Token::Identifier(name), Some(at)) => record.lock().unwrap().push((name.to_string(), at)),
            _ => {}
        }
        token
    });
    let _ = engine.compile(source);
    let out = found.lock().unwrap().clone();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_are_near_misses_and_other_names_are_not() {
        for typo in ["rewrd", "rewad", "reawrd", "Reward", "rewards", "promt", "on_epoch_strat", "onEpochStart", "on_epoch_ed"] {
            assert!(ENTRY_POINTS.iter().any(|e| looks_like(typo, e.name)), "{typo}");
        }
        for other in ["reward", "rewarded", "record", "score", "clamp", "closeness", "on_epoch", "prompt_list", "variants"] {
            assert!(!ENTRY_POINTS.iter().any(|e| looks_like(other, e.name)), "{other}");
        }
    }

    #[test]
    fn definitions_are_found_at_their_fn_keyword() {
        let src = "// fn commented(x) {}\nfn a(x) { \"fn b()\" }\n\n  fn c() { 1 }\n";
        let got: Vec<(String, Option<usize>, Option<usize>)> =
            definition_positions(src).into_iter().map(|(n, p)| (n, p.line(), p.position())).collect();
        assert_eq!(got, [("a".into(), Some(2), Some(1)), ("c".into(), Some(4), Some(3))]);
    }
}
