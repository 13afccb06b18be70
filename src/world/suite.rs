//! The compositional benchmark's prompt set: GenEval's six categories written in the shapes-world
//! grammar, fixed and versioned, each prompt with its category, its scored clauses and its half
//! (train or held-out).
//!
//! | category | prompts | form | scored |
//! |---|---:|---|---|
//! | single_object | 80 | "a red circle on a blue background" | class, count 1, background |
//! | two_object | 99 | "a red circle and a green star on ..." (two classes) | both classes, background |
//! | counting | 81 | "a / two / three red circles on ..." (27 of each) | class, exact count, background |
//! | colors | 94 | "a red circle on ..." (each colour equally often) | class, count 1, colour, background |
//! | position | 100 | "a red circle left of a green star on ..." (each relation 25 times) | classes, position, background |
//! | color_attr | 100 | "a red circle and a green star on ..." (two colours) | classes, colours, background |
//!
//! Shapes are medium (the grammar names no size with two groups); a fifth of the backgrounds are
//! split in two colours. No prompt appears twice. The draws use a local SplitMix64 rather than
//! `rand`, so a dependency upgrade cannot change a released version; a new prompt set is a new
//! version. Each category is halved by a hash of the prompt text into `train` and `heldout`.

use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

use super::caption::{CaptionSpec, Relation, ShapeKind, ShapeSpec, Size};
use super::geneval::{Clauses, Group};
use super::palette::Colour;

/// The name of the current version, what `compositional` means.
pub const LATEST: &str = "compositional-v1";

/// GenEval's six prompt categories (its tag names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    SingleObject,
    TwoObject,
    Counting,
    Colors,
    Position,
    ColorAttr,
}

impl Category {
    pub const ALL: [Category; 6] =
        [Category::SingleObject, Category::TwoObject, Category::Counting, Category::Colors, Category::Position, Category::ColorAttr];

    pub fn name(self) -> &'static str {
        match self {
            Category::SingleObject => "single_object",
            Category::TwoObject => "two_object",
            Category::Counting => "counting",
            Category::Colors => "colors",
            Category::Position => "position",
            Category::ColorAttr => "color_attr",
        }
    }

    /// Prompts of this category in version 1 (GenEval's sizes; counting rounded to 3 x 27).
    fn size_v1(self) -> usize {
        match self {
            Category::SingleObject => 80,
            Category::TwoObject => 99,
            Category::Counting => 81,
            Category::Colors => 94,
            Category::Position => 100,
            Category::ColorAttr => 100,
        }
    }
}

/// Which half of the suite a prompt is in: finetune on `train`, measure on `heldout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Half {
    Train,
    Heldout,
}

impl Half {
    pub fn name(self) -> &'static str {
        match self {
            Half::Train => "train",
            Half::Heldout => "heldout",
        }
    }

    pub fn from_name(name: &str) -> Option<Half> {
        [Half::Train, Half::Heldout].into_iter().find(|h| h.name() == name)
    }
}

/// One benchmark prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuitePrompt {
    pub category: Category,
    pub text: String,
    /// What the detector checks (some categories leave the named colours unscored, as GenEval does).
    pub clauses: Clauses,
    pub half: Half,
}

/// The prompts of a suite by name: `compositional` (the latest version) or `compositional-v1`.
pub fn suite(name: &str) -> anyhow::Result<Vec<SuitePrompt>> {
    match name {
        "compositional" | LATEST => Ok(compositional_v1()),
        other => bail!("unknown suite {other:?}; the suites are: compositional ({LATEST})"),
    }
}

/// Version 1 of the compositional suite, in category order.
pub fn compositional_v1() -> Vec<SuitePrompt> {
    let mut rng = SplitMix64(0x5EED_0001);
    let mut seen = HashSet::new();
    let mut prompts = Vec::new();
    for category in Category::ALL {
        let mut drawn = Vec::new();
        while drawn.len() < category.size_v1() {
            let (spec, clauses) = draw(category, drawn.len(), &mut rng);
            let text = spec.caption();
            if seen.insert(text.clone()) {
                drawn.push(SuitePrompt { category, text, clauses, half: Half::Train });
            }
        }
        split_halves(&mut drawn);
        prompts.extend(drawn);
    }
    prompts
}

/// Puts the half of the prompts with the smaller text hashes in `train`, the rest in `heldout`.
fn split_halves(prompts: &mut [SuitePrompt]) {
    let mut order: Vec<(u64, usize)> = prompts.iter().enumerate().map(|(i, p)| (text_hash(&p.text), i)).collect();
    order.sort();
    for (rank, &(_, i)) in order.iter().enumerate() {
        prompts[i].half = if rank < prompts.len() / 2 { Half::Train } else { Half::Heldout };
    }
}

/// FNV-1a, a fixed hash (std's hasher may change between releases).
fn text_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The `i`th prompt of a category: its spec and scored clauses. The cycled attribute (class,
/// count, colour or relation) keeps each category balanced.
fn draw(category: Category, i: usize, rng: &mut SplitMix64) -> (CaptionSpec, Clauses) {
    let kinds = ShapeKind::ALL;
    let (shapes, relation) = match category {
        Category::SingleObject => (vec![(kinds[i % 7], rng.colour(&[]), 1)], None),
        Category::Counting => (vec![(kinds[(i / 3) % 7], rng.colour(&[]), (i % 3) as u8 + 1)], None),
        Category::Colors => (vec![(rng.kind(&[]), Colour::ALL[i % 8], 1)], None),
        Category::TwoObject | Category::ColorAttr | Category::Position => {
            let (k1, c1) = (rng.kind(&[]), rng.colour(&[]));
            let k2 = rng.kind(&[k1]);
            let c2 = if category == Category::ColorAttr { rng.colour(&[c1]) } else { rng.colour(&[]) };
            let relation = (category == Category::Position).then(|| Relation::ALL[i % 4]);
            (vec![(k1, c1, 1), (k2, c2, 1)], relation)
        }
    };
    let shape_colours: Vec<Colour> = shapes.iter().map(|s| s.1).collect();
    let background = rng.background(&shape_colours);
    let spec = CaptionSpec {
        background: background.clone(),
        shapes: shapes.iter().map(|&(kind, colour, count)| ShapeSpec { colour, kind, size: Size::Medium, count }).collect(),
        relation,
    };
    let scores_colour = matches!(category, Category::Colors | Category::ColorAttr);
    let groups = shapes.iter().map(|&(kind, colour, count)| Group { kind, count, colour: scores_colour.then_some(colour) }).collect();
    (spec, Clauses { background: Some(background), groups, relation })
}

/// SplitMix64: a tiny fixed generator, so the suite never depends on a crate's sampling code.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy + PartialEq>(&mut self, all: &[T], avoid: &[T]) -> T {
        let options: Vec<T> = all.iter().copied().filter(|x| !avoid.contains(x)).collect();
        options[self.below(options.len())]
    }

    fn kind(&mut self, avoid: &[ShapeKind]) -> ShapeKind {
        self.pick(&ShapeKind::ALL, avoid)
    }

    fn colour(&mut self, avoid: &[Colour]) -> Colour {
        self.pick(&Colour::ALL, avoid)
    }

    /// One colour, or two (one time in five), none of them a shape colour.
    fn background(&mut self, shape_colours: &[Colour]) -> Vec<Colour> {
        let first = self.colour(shape_colours);
        if self.below(5) != 0 {
            return vec![first];
        }
        let mut avoid = shape_colours.to_vec();
        avoid.push(first);
        vec![first, self.colour(&avoid)]
    }
}
