//! Where training prompts come from. The Rhai host plugs `prompts.rhai` in behind the same trait.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A distribution over prompts, drawn from with the run's seeded generator.
pub trait PromptSource: Send {
    fn next_prompt(&mut self, rng: &mut ChaCha8Rng) -> anyhow::Result<String>;
}

/// Uniform choice from a fixed list.
pub struct FixedPrompts(pub Vec<String>);

impl FixedPrompts {
    /// The default training prompts: a fixed set drawn from the shapes-world grammar, repeated
    /// often enough that per-prompt reward statistics fill up.
    pub fn shapes_default() -> Self {
        let world = crate::world::ShapesWorld::default();
        Self(world.prompts(7, 8).into_iter().map(|p| p.caption).collect())
    }

    /// The DDPO reference's `simple_animals` prompts, the default for Stable Diffusion models.
    pub fn animals() -> Self {
        let names = "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear \
                     raccoon fox wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat \
                     snake turtle frog chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo";
        Self(names.split_whitespace().map(String::from).collect())
    }
}

impl PromptSource for FixedPrompts {
    fn next_prompt(&mut self, rng: &mut ChaCha8Rng) -> anyhow::Result<String> {
        anyhow::ensure!(!self.0.is_empty(), "the prompt list is empty");
        Ok(self.0[rng.random_range(0..self.0.len())].clone())
    }
}
