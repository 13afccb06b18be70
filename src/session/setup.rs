//! Assembling a session's parts from a [`RunConfig`]: the policy (any family), the reward
//! (built-in or script), the prompt source, the hooks, and the frozen base model of the KL term.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::ddpo::{FixedPrompts, PromptSource, Trainer};
use crate::family::{self, Family, OpenOptions};
use crate::reward::models::LazyModels;
use crate::reward::{Reward, Weighted, Weights};
use crate::run::{RewardSpec, RunConfig};
use crate::script::{HookRunner, Limits, Log, ScriptReward, ScriptSet};

/// The scripts a run was started with beside its reward (kept in the run folder for resuming).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScriptPaths {
    pub prompts: Option<PathBuf>,
    pub hooks: Option<PathBuf>,
}

/// Where a run folder keeps its [`ScriptPaths`].
const SOURCES_FILE: &str = "scripts/sources.json";

impl ScriptPaths {
    /// Writes them into `run_dir` (nothing when there are none).
    pub(super) fn save(&self, run_dir: &Path) -> anyhow::Result<()> {
        if self.prompts.is_none() && self.hooks.is_none() {
            return Ok(());
        }
        std::fs::create_dir_all(run_dir.join("scripts")).with_context(|| format!("cannot create {}/scripts", run_dir.display()))?;
        crate::io::write_atomic(&run_dir.join(SOURCES_FILE), serde_json::to_string_pretty(self)?.as_bytes())
    }

    /// The paths a run in `run_dir` was started with (none when it used no such scripts).
    pub(super) fn load(run_dir: &Path) -> anyhow::Result<Self> {
        let Ok(text) = std::fs::read_to_string(run_dir.join(SOURCES_FILE)) else { return Ok(Self::default()) };
        serde_json::from_str(&text).with_context(|| format!("{}/{SOURCES_FILE} is corrupt", run_dir.display()))
    }
}

/// A session's loaded parts.
pub(super) struct Parts {
    pub trainer: Trainer,
    /// The reward when it is a script (the REPL calls it directly).
    pub script_reward: Option<Arc<ScriptReward>>,
    pub scripts: ScriptSet,
    pub hooks: HookRunner,
    /// The gold evaluation's reward script, when the run has one.
    pub gold_reward: Option<ScriptReward>,
}

/// Opens a run's policy: trainable, or (`frozen`) as the fixed base model of the KL term.
pub type Opener<'a> = &'a dyn Fn(&RunConfig, bool) -> anyhow::Result<Box<dyn Family>>;

/// The default [`Opener`]: the family of whatever `config.model` is on disk.
pub fn open_model(config: &RunConfig, frozen: bool, device: &candle_core::Device) -> anyhow::Result<Box<dyn Family>> {
    let options = OpenOptions { lora: config.lora, seed: config.train.seed, dtype: config.dtype, clip_sample: config.clip_sample };
    if frozen {
        family::open_frozen(&config.model, None, &options, device)
    } else {
        family::open_trainable(&config.model, &options, device)
    }
}

/// Loads the policy, reward, prompt source and hooks of a run and builds its trainer.
pub(super) fn load_parts(config: &RunConfig, paths: &ScriptPaths, log: Log, device: &candle_core::Device, open: Opener) -> anyhow::Result<Parts> {
    let policy = open(config, false)?;
    let models = LazyModels::new(config.reward_models.clone(), device.clone());
    let gold_reward = match config.eval.as_ref().and_then(|g| g.reward.as_ref()) {
        // A script set of its own: hooks' reward weights and hot reloads never move the yardstick.
        Some(path) => Some(
            ScriptSet::new(Limits::default(), log.clone())
                .with_models(models.clone())
                .load_reward(path)
                .with_context(|| format!("the gold reward {}", path.display()))?,
        ),
        None => None,
    };
    let mut scripts = ScriptSet::new(Limits::default(), log).with_models(models);
    let script_reward = match &config.reward {
        RewardSpec::Script(path) => Some(Arc::new(scripts.load_reward(path)?)),
        RewardSpec::Builtin(_) => None,
    };
    // Hooks' `weights` recombine any reward's components: a script reward applies them per
    // sample itself (its errors name the script); a built-in is wrapped.
    let (reward, weights): (Arc<dyn Reward>, Weights) = match (&script_reward, &config.reward) {
        (Some(r), _) => (r.clone(), r.weights()),
        (None, spec) => {
            let weights = Weights::default();
            let builtin: Arc<dyn Reward> = Arc::from(crate::reward::builtin(&spec.to_string())?);
            (Arc::new(Weighted::new(builtin, weights.clone())), weights)
        }
    };
    let prompts: Box<dyn PromptSource> = match &paths.prompts {
        Some(p) => Box::new(scripts.load_prompts(p)?),
        None => Box::new(FixedPrompts(config.prompts.clone())),
    };
    let hook_script = paths.hooks.as_deref().map(|p| scripts.load_hooks(p)).transpose()?;
    let (mut hooks, prompts) = HookRunner::new(hook_script, (reward.clone(), weights), &config.train, prompts);
    hooks.epochs = config.epochs;
    let mut trainer = Trainer::new(config.train.clone(), policy, reward, prompts)?;
    if config.train.kl_weight > 0.0 && !trainer.policy().has_own_reference() {
        // The model as loaded, never the run's checkpoint: a resumed run keeps the same reference.
        // A LoRA policy is its own reference (adapters off): no second copy.
        let base = open(config, true).with_context(|| format!("loading the base model {} for the KL term", config.model.display()))?;
        trainer.set_base(base);
    }
    Ok(Parts { trainer, script_reward, scripts, hooks, gold_reward })
}
