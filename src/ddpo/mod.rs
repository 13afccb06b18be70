//! DDPO itself: advantages from rewards (per-prompt stat tracking), the policy-gradient losses
//! (IS with PPO clipping, SF, RWR), and the epoch loop that ties sampling, rewards and updates.
//!
//! Not files, CLI or scripts: the run folder lives in `run`, the command line in `cli`.

pub mod advantage;
pub mod loss;
pub mod prompts;
pub mod trainer;

pub use advantage::{Normalisation, StatTracker};
pub use prompts::{FixedPrompts, PromptSource};
pub use trainer::{kl_to_base, range_excess, Algorithm, EpochReport, ProgressFn, Stage, TrainConfig, Trainer};
