//! An advisory lock on a run folder: one process at a time trains (or resumes) it. The lock is
//! the operating system's (flock), so it dies with its process: a kill -9 leaves no stale lock.

use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Context;

pub(super) const LOCK_FILE: &str = ".lock";

/// Held while the run folder is open.
pub(super) struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Locks `dir`, or says which process holds it.
    pub(super) fn acquire(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("process {holder}") };
            anyhow::bail!("{} is in use by {who} (a training run or REPL on the same folder): wait for it to finish, or use another folder", dir.display());
        }
        // The pid only informs a second process; a full disk must not stop the run here.
        let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| write!(file, "{}", std::process::id()));
        Ok(Self { _file: file })
    }
}
