//! Atomic file writes: a temporary file beside the target, then a rename; appends in one write.

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
    let written = safetensors::serialize_to_file(tensors.iter(), metadata, &tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => io_error(io),
        other => anyhow::Error::new(other),
    });
    finish(written, &tmp, path)
}

/// Writes bytes through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    finish(std::fs::write(&tmp, bytes).map_err(io_error), &tmp, path)
}

/// Appends `line` and a newline to `path` (created if missing) in one write, so that a process
/// killed mid-append leaves at most one torn last line, never a record split around another.
pub fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let appended = std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
    appended.map_err(io_error).with_context(|| format!("cannot append to {}", path.display()))
}

/// Moves a written temporary file into place; a failed write removes it (a full disk keeps no
/// half file).
fn finish(written: anyhow::Result<()>, tmp: &Path, path: &Path) -> anyhow::Result<()> {
    if let Err(e) = written {
        let _ = std::fs::remove_file(tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    std::fs::rename(tmp, path).map_err(io_error).with_context(|| format!("cannot move {} into place", path.display()))
}

/// An I/O error stated once (the OS's message), with what to do when the disk is full.
fn io_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::StorageFull {
        anyhow::anyhow!("{e}: free some space")
    } else {
        anyhow::Error::new(e)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}
