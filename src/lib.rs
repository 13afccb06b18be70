//! ddpo: reinforcement-learning finetuning of diffusion models (DDPO, Black et al. 2023).
//!
//! The library does all the work; `main.rs` only hands the command line to [`cli::run`].
//!
//! Module map (each module's own docs say what it owns):
//! - [`error`]: `ConfigError`, a setting with a bad value, named by its field.
//! - [`io`]: atomic file writes and the process's memory figures (the lowest layer).
//! - [`world`]: the procedurally generated shapes world, its caption grammar and tokenizer.
//! - [`render`]: turning tensors into images, labelled sample grids, a tiny bitmap font.
//! - [`kernels`]: project-owned CPU kernels (fast convolution) that candle lacks.
//! - [`model`]: the Stable-Diffusion-architecture UNet and CLIP-style text encoder.
//! - [`family`]: model families behind one trait (the shapes pixel model, Stable Diffusion
//!   folders), the DDPM schedule and DDIM step they share, checkpoints and LoRA adapters.
//! - [`optim`]: AdamW, gradient clipping and EMA with state we own (for exact resume).
//! - [`sampler`]: trajectories with per-step log-probabilities from any family, sample grids.
//! - [`pretrain`]: DDPM pretraining of the embedded default model.
//! - [`dist`]: data-parallel process groups (one process, or MPI ranks) and their collectives.
//! - [`ddpo`]: advantages, DDPO-IS / SF / RWR losses and the training epoch.
//! - [`reward`]: the `Reward` trait and built-in rewards (JPEG size, brightness).
//! - [`script`]: the sandboxed Rhai host: script rewards and prompts, host API, hot reload.
//! - [`run`]: the training run folder: metrics, sample grids, reward curve, checkpoints.
//! - [`session`]: a training run in progress: epochs, script reloads, hooks, records, stops.
//! - [`eval`]: benchmarks of a policy: the compositional suite run, its report, table and grids;
//!   gold evaluations; paired base-versus-finetuned evaluations.
//! - [`selftest`]: the golden checks on any device and dtype, behind `ddpo selftest`.
//! - [`bench`]: the fixed benchmark workloads and JSON report behind `ddpo bench`.
//! - [`experiment`]: the runs of an experiment script, resumable, and their table and curves.
//! - [`cli`]: the command line (clap), progress bars and user-facing errors.

pub mod bench;
pub mod cli;
pub mod ddpo;
pub mod dist;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod family;
pub mod io;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod pretrain;
pub mod render;
pub mod reward;
pub mod run;
pub mod sampler;
pub mod script;
pub mod selftest;
pub mod session;
pub mod world;
