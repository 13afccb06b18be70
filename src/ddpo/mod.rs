//! DDPO itself: advantages from rewards (per-prompt stat tracking), the policy-gradient losses
//! (IS with PPO clipping, SF, RWR), and the epoch that ties sampling, rewards and updates, over
//! any model family.
//!
//! Not files, the command line or scripts: the run lives in `session` and `run`.

pub mod advantage;
pub mod config;
pub mod loss;
pub mod monitor;
pub mod prompts;
pub mod trainer;

pub use advantage::{group_advantages, GroupAdvantages, Normalisation, StatTracker};
pub use config::{Algorithm, ConfigError, TrainConfig};
pub use prompts::{FixedPrompts, PromptSource};
pub use trainer::{component_means, kl_to_base, range_excess, EpochReport, ProgressFn, Stage, Trainer, TrainerState};
