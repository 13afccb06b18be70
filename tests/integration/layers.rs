//! The module layers of `src/` (README, "How it works"): a module may use modules of its own
//! layer or below, never above; and no two top-level modules use each other (no cycles). Read
//! from the source: every `crate::<module>` path in a file of `src/<module>/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom up; each module's layer is its index.
const LAYERS: &[&[&str]] = &[
    &["error", "io", "kernels", "world", "render", "optim", "dist"],
    &["model"],
    &["family"],
    &["sampler"],
    &["reward", "eval"],
    &["ddpo"],
    &["script"],
    &["run"],
    &["session"],
    &["pretrain", "bench", "selftest", "experiment"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a source file belongs to (`src/family/sd/vae.rs` -> `family`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Which top-level modules each module's code names (`crate::x`), ignoring comments.
fn uses() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else { continue };
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines().map(str::trim_start).filter(|l| !l.starts_with("//")) {
            for (i, _) in line.match_indices("crate::") {
                let rest = &line[i + "crate::".len()..];
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != module {
                    uses.entry(module.clone()).or_default().insert(name);
                }
            }
        }
    }
    uses
}

#[test]
fn every_module_has_a_layer() {
    for (module, used) in uses() {
        assert!(layer_of(&module).is_some(), "src/{module} has no layer in LAYERS");
        for u in used {
            assert!(layer_of(&u).is_some(), "src/{module} uses crate::{u}, which has no layer in LAYERS");
        }
    }
}

#[test]
fn no_module_uses_a_higher_layer() {
    let mut upward = Vec::new();
    for (module, used) in uses() {
        let Some(own) = layer_of(&module) else { continue };
        for u in used.iter().filter(|u| layer_of(u).is_some_and(|l| l > own)) {
            upward.push(format!("{module} -> {u}"));
        }
    }
    assert!(upward.is_empty(), "imports from a lower layer to a higher one: {upward:?}");
}

#[test]
fn no_two_modules_use_each_other() {
    let uses = uses();
    let mut cycles = Vec::new();
    for (a, used) in &uses {
        for b in used {
            if a < b && uses.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "folder-level import cycles: {cycles:?}");
}
