//! The lowest layer's dealings with the operating system: files written atomically (a crash
//! leaves the old file or the new one, never half of either) and the process's memory figures.
//! Every other module writes its files through here; nothing here knows what the files hold.

mod atomic;
mod memory;

pub use atomic::{append_line, save_tensors_atomic, save_tensors_atomic_with_metadata, write_atomic};
pub use memory::{memory_mb, peak_rss_mb};
