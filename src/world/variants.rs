//! Caption variants that differ from a caption in exactly one attribute: the distractors of the
//! small CLIP's zero-shot evaluation ("which of these captions fits the image?") and the hard
//! negatives of its contrastive training.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::caption::{CaptionSpec, ShapeKind};
use super::palette::Colour;

/// The attribute a variant changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribute {
    /// The colour of the first shape group (never to a background colour).
    Colour,
    /// The kind of the first shape group.
    Shape,
    /// How many shapes (1, 2 or 3); only for captions with a single group.
    Count,
    /// The first background colour (never to a shape colour or the other background colour).
    Background,
}

impl Attribute {
    pub const ALL: [Attribute; 4] = [Attribute::Colour, Attribute::Shape, Attribute::Count, Attribute::Background];

    pub fn name(self) -> &'static str {
        match self {
            Attribute::Colour => "colour",
            Attribute::Shape => "shape",
            Attribute::Count => "count",
            Attribute::Background => "background",
        }
    }
}

/// Every caption that differs from `spec` in `attribute` alone (empty when the attribute does
/// not apply, e.g. the count of a two-group caption).
pub fn variants(spec: &CaptionSpec, attribute: Attribute) -> Vec<CaptionSpec> {
    let with = |f: &dyn Fn(&mut CaptionSpec)| {
        let mut s = spec.clone();
        f(&mut s);
        s
    };
    match attribute {
        Attribute::Colour => Colour::ALL
            .into_iter()
            .filter(|c| *c != spec.shapes[0].colour && !spec.background.contains(c))
            .map(|c| with(&|s| s.shapes[0].colour = c))
            .collect(),
        Attribute::Shape => ShapeKind::ALL
            .into_iter()
            .filter(|k| *k != spec.shapes[0].kind)
            .map(|k| with(&|s| s.shapes[0].kind = k))
            .collect(),
        Attribute::Count if spec.shapes.len() == 1 => (1..=3u8)
            .filter(|n| *n != spec.shapes[0].count)
            .map(|n| with(&|s| s.shapes[0].count = n))
            .collect(),
        Attribute::Count => Vec::new(),
        Attribute::Background => Colour::ALL
            .into_iter()
            .filter(|c| !spec.background.contains(c) && !spec.shapes.iter().any(|g| g.colour == *c))
            .map(|c| with(&|s| s.background[0] = c))
            .collect(),
    }
}

/// One variant of `spec` in a random applicable attribute (for hard negatives).
pub fn random_variant(spec: &CaptionSpec, rng: &mut impl Rng) -> CaptionSpec {
    let attribute = Attribute::ALL[rng.random_range(0..Attribute::ALL.len())];
    let mut options = variants(spec, attribute);
    if options.is_empty() {
        options = variants(spec, Attribute::Shape); // always 6 options
    }
    options.swap_remove(rng.random_range(0..options.len()))
}
