//! Benchmarks of a policy: sample a fixed prompt set, score the images, report.
//!
//! - [`suite`]: the compositional suite (GenEval's design on the shapes world).
//! - [`gold`]: a training run's gold score on held-out suite prompts, with diversity and range.
//! - [`compare`]: two models on the suite, paired, with a confidence interval of the change.
//! - [`paired`]: base versus finetuned on the same prompts and noise, by one reward.

pub mod compare;
pub mod gold;
pub mod paired;
pub mod suite;
