//! (placeholder, replaced by the world work)
