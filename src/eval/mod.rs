//! Benchmarks of a policy: sample a fixed prompt set, score the images, report.
//!
//! - [`suite`]: the compositional suite (GenEval's design on the shapes world).

pub mod suite;
