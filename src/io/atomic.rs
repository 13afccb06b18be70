//! Atomic file writes: a temporary file beside the target, then a rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Tensor;

/// Writes a safetensors file through a temporary file and a rename.
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    save_tensors_atomic_with_metadata(tensors, None, path)
}

/// As [`save_tensors_atomic`], with string metadata in the file's header.
pub fn save_tensors_atomic_with_metadata(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(tensors.iter(), metadata, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))
}

/// Writes bytes through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}
