//! Sampling from the diffusion policy: the noise schedule, the DDIM step with per-step
//! log-probabilities (and its differentiable recompute), seeded noise, and whole trajectories.
//!
//! Owns the maths of sampling; not optimisers, rewards or files.

pub mod ddim;
pub mod noise;
pub mod schedule;
pub mod trajectory;

pub use ddim::{ddim_sigma, ddim_step, StepOutput};
pub use noise::{NoiseRng, NoiseRngState};
pub use schedule::{NoiseSchedule, ScheduleConfig};
pub use trajectory::{sample, transition, SamplerConfig, Trajectory};
