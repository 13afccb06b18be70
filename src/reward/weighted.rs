//! [`Weighted`]: any reward whose total is recombined from its named components when weights
//! are set (schedule hooks set them between epochs, e.g. a curriculum over components).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use image::RgbImage;

use super::{Reward, Score};

/// Component name -> weight, shared between a [`Weighted`] reward and whoever sets the weights.
/// Empty: the reward's own total counts.
pub type Weights = Arc<RwLock<BTreeMap<String, f64>>>;

/// A component that weights name but a score lacks.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingComponent {
    pub name: String,
    pub have: BTreeSet<String>,
}

impl std::fmt::Display for MissingComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "has no component `{}`, which the hooks weight (its components: {:?})", self.name, self.have)
    }
}

impl std::error::Error for MissingComponent {}

/// Sets `score.total` to the weighted sum of its components named in `weights` (unchanged when
/// `weights` is empty); the components themselves stay as they were, for the logs.
pub fn reweigh(score: &mut Score, weights: &BTreeMap<String, f64>) -> Result<(), MissingComponent> {
    if weights.is_empty() {
        return Ok(());
    }
    let mut total = 0.0;
    for (name, w) in weights {
        let Some(c) = score.components.get(name) else {
            return Err(MissingComponent { name: name.clone(), have: score.components.keys().cloned().collect() });
        };
        total += w * c;
    }
    score.total = total;
    Ok(())
}

/// A reward whose total is [`reweigh`]ed by shared weights; name and components are the inner
/// reward's.
pub struct Weighted {
    inner: Arc<dyn Reward>,
    weights: Weights,
}

impl Weighted {
    pub fn new(inner: Arc<dyn Reward>, weights: Weights) -> Self {
        Self { inner, weights }
    }

    /// The handle that sets the weights in effect.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }
}

impl Reward for Weighted {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn score(&self, images: &[RgbImage], prompts: &[String]) -> anyhow::Result<Vec<Score>> {
        let mut scores = self.inner.score(images, prompts)?;
        let weights = self.weights.read().unwrap().clone();
        for (i, (s, prompt)) in scores.iter_mut().zip(prompts).enumerate() {
            reweigh(s, &weights).map_err(|e| anyhow::anyhow!("{}: reward for sample {i}, prompt {prompt:?} {e}", self.inner.name()))?;
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::JpegCompressibility;

    fn batch() -> (Vec<RgbImage>, Vec<String>) {
        crate::world::ShapesWorld::default().batch(1, 3).into_iter().map(|s| (s.image, s.caption)).unzip()
    }

    #[test]
    fn weights_recombine_a_builtin_rewards_components() {
        let weights = Weights::default();
        let reward = Weighted::new(Arc::new(JpegCompressibility), weights.clone());
        let (images, prompts) = batch();
        let plain = JpegCompressibility.score(&images, &prompts).unwrap();
        assert_eq!(reward.score(&images, &prompts).unwrap(), plain, "no weights: the reward's own total");
        *weights.write().unwrap() = BTreeMap::from([("jpeg_kb".to_string(), 2.0)]);
        let weighted = reward.score(&images, &prompts).unwrap();
        for (w, p) in weighted.iter().zip(&plain) {
            assert_eq!(w.total, 2.0 * p.components["jpeg_kb"]);
            assert_eq!(w.components, p.components);
        }
        assert_eq!(reward.name(), "compressibility");
    }

    #[test]
    fn weighting_a_missing_component_names_it() {
        let weights = Weights::new(RwLock::new(BTreeMap::from([("sharpness".to_string(), 1.0)])));
        let reward = Weighted::new(Arc::new(JpegCompressibility), weights);
        let (images, prompts) = batch();
        let e = reward.score(&images, &prompts).unwrap_err().to_string();
        assert!(e.contains("sample 0") && e.contains("no component `sharpness`") && e.contains("jpeg_kb"), "{e}");
    }
}
