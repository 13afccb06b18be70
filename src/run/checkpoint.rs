//! Checkpoints of a run: `checkpoint/` (the latest) and `checkpoint.prev/` (the one before),
//! each a folder of `policy.safetensors`, `optimizer.safetensors` and `state.json`. A new one is
//! written whole into `checkpoint.new/` and swapped in by renames, so a crash or a failed write
//! at any moment leaves a complete checkpoint; resuming falls back to the previous one when the
//! latest cannot be read, and says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};

use super::RunDir;
use crate::ddpo::{Trainer, TrainerState};
use crate::io::{save_tensors_atomic, write_atomic};

/// A checkpoint read into memory, before anything is applied to the trainer.
struct Loaded {
    weights: HashMap<String, Tensor>,
    optimizer: HashMap<String, Tensor>,
    state: TrainerState,
}

fn load(dir: &Path, device: &Device) -> anyhow::Result<Loaded> {
    let tensors = |name: &str| {
        let path = dir.join(name);
        candle_core::safetensors::load(&path, device).with_context(|| format!("cannot read {}", path.display()))
    };
    let (weights, optimizer) = (tensors("policy.safetensors")?, tensors("optimizer.safetensors")?);
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let state = serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))?;
    Ok(Loaded { weights, optimizer, state })
}

fn write(dir: &Path, trainer: &Trainer) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    trainer.policy().save(&dir.join("policy.safetensors"))?;
    save_tensors_atomic(&trainer.optimizer_state()?, &dir.join("optimizer.safetensors"))?;
    write_atomic(&dir.join("state.json"), serde_json::to_string_pretty(&trainer.state())?.as_bytes())
}

impl RunDir {
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }

    /// The weights of the latest checkpoint (loadable by `ddpo sample --model`).
    pub fn policy_path(&self) -> PathBuf {
        self.checkpoint_dir().join("policy.safetensors")
    }

    fn previous_dir(&self) -> PathBuf {
        self.dir.join("checkpoint.prev")
    }

    /// Writes the trainer whole into the staging folder `name`, removed again on a failed write.
    fn stage(&self, name: &str, trainer: &Trainer) -> anyhow::Result<PathBuf> {
        let fresh = self.dir.join(name);
        let _ = std::fs::remove_dir_all(&fresh);
        if let Err(e) = write(&fresh, trainer) {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(e);
        }
        Ok(fresh)
    }

    /// Writes weights, optimiser state, RNG, stat tracker and epoch as one checkpoint folder; the
    /// latest one before it stays as `checkpoint.prev`. On a failed write the existing
    /// checkpoints are untouched.
    pub fn save_checkpoint(&self, trainer: &Trainer) -> anyhow::Result<()> {
        let fresh = self.stage("checkpoint.new", trainer).context("checkpoint not written (the existing checkpoints are unchanged)")?;
        let (current, previous) = (self.checkpoint_dir(), self.previous_dir());
        if current.exists() {
            let _ = std::fs::remove_dir_all(&previous);
            std::fs::rename(&current, &previous).with_context(|| format!("cannot move {} aside", current.display()))?;
        }
        std::fs::rename(&fresh, &current).with_context(|| format!("cannot move {} into place", fresh.display()))
    }

    /// Writes the trainer as it is into `best/` (the checkpoint with the best gold score); returns
    /// its weights' path.
    pub fn save_best(&self, trainer: &Trainer) -> anyhow::Result<PathBuf> {
        let fresh = self.stage("best.new", trainer).context("the best checkpoint was not written (the previous best is unchanged)")?;
        let best = self.dir.join("best");
        let _ = std::fs::remove_dir_all(&best);
        std::fs::rename(&fresh, &best).with_context(|| format!("cannot move {} into place", fresh.display()))?;
        Ok(best.join("policy.safetensors"))
    }

    /// Restores the trainer from the latest readable checkpoint (the previous one when the
    /// latest is damaged; the run's start when there is none yet), drops the metrics of the
    /// epochs after it, and returns a note saying which it used when it was not the latest.
    pub fn restore(&mut self, trainer: &mut Trainer) -> anyhow::Result<Option<String>> {
        let device = trainer.policy().device().clone();
        let (latest, previous) = (self.checkpoint_dir(), self.previous_dir());
        let mut note = None;
        let loaded = match load(&latest, &device) {
            Ok(l) => Some(l),
            Err(e) if previous.exists() => {
                let l = load(&previous, &device).with_context(|| format!("the latest checkpoint is unreadable ({e:#}), and so is the previous one"))?;
                note = Some(format!("the latest checkpoint is unreadable ({e:#}); resuming from the previous one, epoch {}", l.state.epoch));
                Some(l)
            }
            Err(_) if !latest.exists() => {
                note = Some("no checkpoint was written yet: the run starts again from epoch 0".to_string());
                None
            }
            Err(e) => return Err(e.context(format!("{} has no readable checkpoint", self.dir.display()))),
        };
        let epochs = match loaded {
            Some(l) => {
                let epochs = l.state.epoch;
                trainer.restore(&l.weights, &l.optimizer, l.state)?;
                epochs
            }
            None => 0,
        };
        // Metrics of epochs after the checkpoint are replayed by the resumed run: drop them.
        self.truncate_metrics(epochs)?;
        self.reload_curve()?;
        Ok(note)
    }
}
