//! [`ScriptPrompts`]: a [`PromptSource`] that calls `fn prompt()` of a script, which returns a
//! string or `#{ prompt: "..", meta: #{ .. } }`. `rand()` & co. draw from the run's generator, so
//! the prompts of a run are reproducible from its seed.

use std::sync::{Arc, RwLock};

use rand_chacha::ChaCha8Rng;
use rhai::Map;

use super::{Host, ScriptError, Shared, Version};
use crate::ddpo::PromptSource;

/// A script prompt source; the version it runs can be swapped by [`super::ScriptSet::reload`].
pub struct ScriptPrompts {
    pub(crate) host: Arc<Host>,
    pub(crate) current: Arc<RwLock<Arc<Version>>>,
    pub(crate) shared: Shared,
}

impl ScriptPrompts {
    /// Content hash of the version in use.
    pub fn hash(&self) -> String {
        self.current.read().unwrap().hash.clone()
    }

    /// Draws one prompt from `version`, recording its meta for the reward.
    pub(crate) fn draw(host: &Host, shared: &Shared, version: &Version, rng: &mut ChaCha8Rng) -> Result<String, ScriptError> {
        let value = super::api::with_rng(rng, || host.call(version, "prompt", Vec::new()))?;
        let bad = |what: String| ScriptError::new(&host.display, format!("prompt() returned {what}"));
        let (prompt, meta) = if value.is_string() {
            (value.into_string().unwrap_or_default(), Map::new())
        } else if let Some(mut map) = value.clone().try_cast::<Map>() {
            let p = map.remove("prompt").ok_or_else(|| bad("a map without a `prompt` entry".into()))?;
            let p = p.clone().into_string().map_err(|t| bad(format!("a map whose `prompt` is a {t}, not a string")))?;
            let meta = match map.remove("meta") {
                None => Map::new(),
                Some(m) => m.try_cast::<Map>().ok_or_else(|| bad("a map whose `meta` is not a map".into()))?,
            };
            (p, meta)
        } else {
            return Err(bad(format!("{value} ({}), not a string or #{{ prompt: .., meta: #{{..}} }}", super::engine::type_name(&value))));
        };
        if prompt.trim().is_empty() {
            return Err(bad("an empty prompt".into()));
        }
        let mut registry = shared.meta.lock().unwrap();
        if meta.is_empty() {
            registry.remove(&prompt);
        } else {
            registry.insert(prompt.clone(), meta);
        }
        Ok(prompt)
    }
}

impl PromptSource for ScriptPrompts {
    fn next_prompt(&mut self, rng: &mut ChaCha8Rng) -> anyhow::Result<String> {
        let version = self.current.read().unwrap().clone();
        Ok(Self::draw(&self.host, &self.shared, &version, rng)?)
    }
}
