//! Sampling from any model family ([`crate::family::Family`]): whole trajectories that record
//! every transition and its log-prob, the differentiable recompute of a stored transition, and
//! batches of images and labelled grids for a list of prompts.
//!
//! Owns the loop over steps; a family owns the maths of each step.

pub mod trajectory;

pub use crate::family::{NoiseRng, NoiseRngState, SamplerConfig, StepOutput};
pub use trajectory::{count_out_of_range, sample, sample_grouped, sample_images, sample_images_with_range, transition, write_sample_grid, Trajectory};
