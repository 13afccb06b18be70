//! DDPM maths shared by the epsilon-predicting UNet families: the noise schedule (betas,
//! cumulative alphas, DDIM timesteps) and the DDIM step with its exact Gaussian log-prob.

pub mod ddim;
pub mod schedule;

pub use ddim::{ddim_sigma, ddim_step};
pub use schedule::{NoiseSchedule, ScheduleConfig};
