//! The shapes world: a deterministic, seeded generator of small captioned RGB
//! images, the caption grammar and its tokenizer, and a pixel-level judge.
//!
//! Images are `size` x `size` (32 by default; any size from 16 up, shapes scale
//! with it) with one to three anti-aliased shapes — circle, square, triangle,
//! cross, ring, diamond, star; small, medium or large — in colours of a fixed
//! palette ([`Colour`]), on a solid background (80%) or one split into two
//! halves (left/right or top/bottom). Shapes never share a colour with the
//! background. Every caption names the background, e.g.
//!
//! - "a red circle on a blue background"
//! - "two small green squares on a black background"
//! - "a yellow triangle above a white ring on a purple background"
//! - "a large orange cross on a red and white background"
//!
//! The grammar is in [`caption`]. Two things make it hard on purpose, so a
//! pretrained model is imperfect and RL finetuning has something to fix:
//!
//! - **Rare combos**: the colour/shape pairs in [`RARE_COMBOS`] (orange circle,
//!   white square, blue triangle, purple cross, yellow ring, red diamond, green
//!   star) are drawn 10x less often than the others.
//! - **Compositional relations**: "A above/below/left of/right of B" pairs any two
//!   looks, so most such captions never occur verbatim in training data.
//!
//! [`judge`] checks an image against a caption's background and shape colours; [`detect`] finds
//! each object's colour, shape, area and place, [`geneval`] scores that against a caption as
//! GenEval does, and [`suite`] is the fixed compositional benchmark's prompt set.
//! Everything here is plain Rust; tensors live in `render`.

pub mod caption;
pub mod composition;
pub mod detect;
pub mod geneval;
pub mod judge;
pub mod palette;
pub mod scene;
pub mod suite;
pub mod tokenizer;
pub mod variants;

pub use caption::{
    is_rare, parse_caption, CaptionSpec, GrammarWeights, Relation, ShapeKind, ShapeSpec, Size,
    RARE_COMBOS,
};
pub use composition::{composition, Composition};
pub use detect::{detect, Detection, Object};
pub use geneval::{geneval, Clauses, Score};
pub use judge::{judge, Judgement};
pub use palette::Colour;
pub use scene::{relation_holds, PlacedShape, Scene, Split};
pub use tokenizer::Tokenizer;
pub use variants::{variants, Attribute};

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Smallest image side at which the shapes stay recognisable.
pub const MIN_SIZE: u32 = 16;
/// Largest image side accepted, to keep a typo from allocating gigabytes.
pub const MAX_SIZE: u32 = 1024;

/// How the world draws its images.
#[derive(Clone, Debug, PartialEq)]
pub struct WorldConfig {
    /// Image side in pixels.
    pub size: u32,
    /// Subsamples per pixel side for anti-aliasing (4 means 4x4).
    pub supersample: u32,
    /// Probabilities of the caption grammar's choices.
    pub grammar: GrammarWeights,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            size: 32,
            supersample: 4,
            grammar: GrammarWeights::default(),
        }
    }
}

/// One generated image with its caption.
#[derive(Clone, Debug)]
pub struct WorldSample {
    pub image: image::RgbImage,
    pub caption: String,
    pub spec: CaptionSpec,
    /// The layout the image was painted from.
    pub scene: Scene,
}

/// A caption drawn from the grammar without an image (an evaluation prompt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    pub caption: String,
    pub spec: CaptionSpec,
}

/// The generator of captioned images.
#[derive(Clone, Debug, Default)]
pub struct ShapesWorld {
    cfg: WorldConfig,
}

impl ShapesWorld {
    pub fn new(cfg: WorldConfig) -> Result<Self> {
        ensure!(
            (MIN_SIZE..=MAX_SIZE).contains(&cfg.size),
            "shapes world image size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {}",
            cfg.size
        );
        cfg.grammar
            .validate()
            .context("invalid shapes world grammar")?;
        ensure!(
            cfg.supersample >= 1,
            "shapes world supersampling must be at least 1, got 0"
        );
        Ok(Self { cfg })
    }

    pub fn config(&self) -> &WorldConfig {
        &self.cfg
    }

    /// Draws a caption and paints an image that follows it.
    pub fn sample(&self, rng: &mut impl Rng) -> WorldSample {
        let spec = caption::sample_spec(rng, &self.cfg.grammar);
        let scene = Scene::layout(&spec, self.cfg.size, rng);
        WorldSample {
            image: scene.render(self.cfg.supersample),
            caption: spec.caption(),
            spec,
            scene,
        }
    }

    /// `n` samples, identical for identical `seed`s.
    pub fn batch(&self, seed: u64, n: usize) -> Vec<WorldSample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| self.sample(&mut rng)).collect()
    }

    /// A caption from the same grammar as the images, without painting one.
    pub fn sample_prompt(&self, rng: &mut impl Rng) -> Prompt {
        let spec = caption::sample_spec(rng, &self.cfg.grammar);
        Prompt {
            caption: spec.caption(),
            spec,
        }
    }

    /// `n` prompts, identical for identical `seed`s.
    pub fn prompts(&self, seed: u64, n: usize) -> Vec<Prompt> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| self.sample_prompt(&mut rng)).collect()
    }
}
