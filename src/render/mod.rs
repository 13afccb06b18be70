//! (placeholder, replaced by the render work)
