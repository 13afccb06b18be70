//! [`ScriptReward`]: a [`Reward`] whose score is `fn reward(img, prompt, meta)` of a script.
//! The function returns a number (the total) or a map of named components with a `total`;
//! anything else, NaN or infinity is an error naming the file, the prompt and the sample.
//! A batch is scored image by image; for a script that asks the VLM (`vlm_ask`, `vlm_score`)
//! on parallel threads, so that its requests overlap.

use std::sync::{Arc, RwLock};

use image::RgbImage;
use rayon::prelude::*;
use rhai::{Dynamic, Map};

use super::api::number;
use super::{Host, Image, ScriptError, Shared, Version};
use crate::reward::{Reward, Score};

/// A script reward; the version it runs can be swapped by [`super::ScriptSet::reload`].
pub struct ScriptReward {
    pub(crate) name: String,
    pub(crate) host: Arc<Host>,
    pub(crate) current: Arc<RwLock<Arc<Version>>>,
    pub(crate) shared: Shared,
}

impl ScriptReward {
    /// Content hash of the version in use.
    pub fn hash(&self) -> String {
        self.current.read().unwrap().hash.clone()
    }

    /// Scores one image with `version`; `sample` is its index in the batch.
    pub(crate) fn score_one(host: &Host, shared: &Shared, version: &Version, img: &RgbImage, prompt: &str, sample: usize) -> anyhow::Result<Score> {
        let meta = shared.meta.lock().unwrap().get(prompt).cloned().unwrap_or_default();
        let mut score = Self::score_meta(host, version, img, prompt, meta, sample)?;
        shared
            .reweigh(&mut score)
            .map_err(|what| ScriptError::new(&host.display, format!("reward for sample {sample}, prompt {prompt:?} {what}")))?;
        Ok(score)
    }

    /// The handle of the weights hooks set on this reward's components (applied per sample, so
    /// a bad weight is a script error that names the sample).
    pub fn weights(&self) -> crate::reward::Weights {
        self.shared.weights.clone()
    }

    /// Scores one image with the version in use and an explicit `meta` (the REPL's `reward`).
    pub fn score_with_meta(&self, img: &RgbImage, prompt: &str, meta: Map) -> anyhow::Result<Score> {
        let version = self.current.read().unwrap().clone();
        Self::score_meta(&self.host, &version, img, prompt, meta, 0)
    }

    fn score_meta(host: &Host, version: &Version, img: &RgbImage, prompt: &str, meta: Map, sample: usize) -> anyhow::Result<Score> {
        let at = || format!("sample {sample}, prompt {prompt:?}");
        let value = host
            .call(version, "reward", vec![Dynamic::from(Image::new(img.clone())), prompt.into(), meta.into()])
            .map_err(|e| ScriptError { message: format!("{} ({})", e.message, at()), ..e })?;
        let bad = |what: String| ScriptError::new(&host.display, format!("reward for {} {what}", at()));
        let score = if let Some(total) = number(&value) {
            Score::new(total)
        } else if let Some(map) = value.clone().try_cast::<Map>() {
            let mut score = Score::new(f64::NAN);
            let mut total = None;
            for (k, v) in map {
                let Some(x) = number(&v) else {
                    return Err(bad(format!("has component {k:?} = {v} ({}), not a number", super::engine::type_name(&v))).into());
                };
                if k == "total" {
                    total = Some(x);
                } else {
                    score.components.insert(k.to_string(), x);
                }
            }
            score.total = total.ok_or_else(|| bad("is a map without a `total` entry".into()))?;
            score
        } else {
            return Err(bad(format!("is {value:?} ({}), not a number or a map with a `total`", super::engine::type_name(&value))).into());
        };
        if !score.total.is_finite() || score.components.values().any(|v| !v.is_finite()) {
            return Err(bad(format!("is not a finite number: total {}, components {:?}", score.total, score.components)).into());
        }
        Ok(score)
    }
}

impl Reward for ScriptReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, images: &[RgbImage], prompts: &[String]) -> anyhow::Result<Vec<Score>> {
        anyhow::ensure!(images.len() == prompts.len(), "{} images but {} prompts", images.len(), prompts.len());
        let version = self.current.read().unwrap().clone();
        if version.uses_models() {
            // One batched CLIP pass for the whole batch, outside the scripts' deadline.
            self.shared.models.get()?.prefetch(&images.iter().collect::<Vec<_>>())?;
        }
        let score = |i: usize| Self::score_one(&self.host, &self.shared, &version, &images[i], &prompts[i], i);
        if !version.uses_vlm() || images.len() < 2 {
            return (0..images.len()).map(score).collect();
        }
        // Requests to the VLM wait on the network: score the images on parallel threads (as
        // many as requests may be in flight) so they overlap. Each score depends on its own
        // image and prompt only, so the results are the serial ones, in order.
        let threads = self.shared.models.vlm()?.concurrency().min(images.len());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("vlm-score-{i}"))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot start {threads} scoring threads: {e}"))?;
        pool.install(|| (0..images.len()).into_par_iter().map(score).collect())
    }
}
