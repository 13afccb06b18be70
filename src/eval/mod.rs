//! Benchmarks of a policy: sample a fixed prompt set, score the images, report.
//!
//! - [`suite`]: the compositional suite (GenEval's design on the shapes world).
//! - [`gold`]: a training run's gold score on held-out suite prompts, with diversity and range.

pub mod gold;
pub mod suite;
