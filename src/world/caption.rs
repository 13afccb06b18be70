//! The caption grammar: the structured meaning of a caption ([`CaptionSpec`]),
//! how specs are sampled, written out as text, and parsed back.
//!
//! ```text
//! caption    := groups "on" article colour ("and" colour)? "background"
//! groups     := group | group relation group | group "and" group
//! group      := count size? colour shape
//! count      := "a" | "an" | "two" | "three"      (plural shape after two/three)
//! size       := "small" | "large"                  (medium is never named)
//! relation   := "above" | "below" | "left of" | "right of"
//! ```
//!
//! Generated captions are at most 14 words, so they fit the default 16-token
//! context with `<bos>` and `<eos>`: that is why captions with two groups never
//! name a size (their shapes are always medium).

use super::palette::Colour;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
    Cross,
    Ring,
    Diamond,
    Star,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 7] = [
        ShapeKind::Circle,
        ShapeKind::Square,
        ShapeKind::Triangle,
        ShapeKind::Cross,
        ShapeKind::Ring,
        ShapeKind::Diamond,
        ShapeKind::Star,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
            ShapeKind::Cross => "cross",
            ShapeKind::Ring => "ring",
            ShapeKind::Diamond => "diamond",
            ShapeKind::Star => "star",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circles",
            ShapeKind::Square => "squares",
            ShapeKind::Triangle => "triangles",
            ShapeKind::Cross => "crosses",
            ShapeKind::Ring => "rings",
            ShapeKind::Diamond => "diamonds",
            ShapeKind::Star => "stars",
        }
    }

    /// Parses a singular or plural shape word; the flag is true for plurals.
    fn from_word(word: &str) -> Option<(ShapeKind, bool)> {
        ShapeKind::ALL.into_iter().find_map(|k| {
            if k.name() == word {
                Some((k, false))
            } else if k.plural() == word {
                Some((k, true))
            } else {
                None
            }
        })
    }
}

impl fmt::Display for ShapeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    /// The caption word; medium shapes are the unnamed default.
    pub fn word(self) -> Option<&'static str> {
        match self {
            Size::Small => Some("small"),
            Size::Medium => None,
            Size::Large => Some("large"),
        }
    }

    fn from_word(word: &str) -> Option<Size> {
        match word {
            "small" => Some(Size::Small),
            "large" => Some(Size::Large),
            _ => None,
        }
    }
}

/// Where the first shape group sits relative to the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::Above,
        Relation::Below,
        Relation::LeftOf,
        Relation::RightOf,
    ];

    pub fn words(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
        }
    }
}

/// One group of identical shapes in a caption ("two small green squares").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShapeSpec {
    pub colour: Colour,
    pub kind: ShapeKind,
    pub size: Size,
    pub count: u8,
}

/// The structured meaning of a caption.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CaptionSpec {
    /// One colour, or two for a split background (left/top colour first).
    pub background: Vec<Colour>,
    /// One or two groups, at most three shapes in all.
    pub shapes: Vec<ShapeSpec>,
    /// Relation of `shapes[0]` to `shapes[1]` (both single shapes), if any.
    pub relation: Option<Relation>,
}

impl CaptionSpec {
    /// The caption text, e.g. "a yellow triangle above a white ring on a purple background".
    pub fn caption(&self) -> String {
        let mut words: Vec<&str> = Vec::new();
        for (i, group) in self.shapes.iter().enumerate() {
            if i == 1 {
                words.extend(self.relation.map_or("and", Relation::words).split(' '));
            }
            let first = group.size.word().unwrap_or(group.colour.name());
            words.push(count_word(group.count, first));
            words.extend(group.size.word());
            words.push(group.colour.name());
            words.push(if group.count == 1 {
                group.kind.name()
            } else {
                group.kind.plural()
            });
        }
        words.push("on");
        words.push(article(self.background[0].name()));
        for (i, colour) in self.background.iter().enumerate() {
            if i > 0 {
                words.push("and");
            }
            words.push(colour.name());
        }
        words.push("background");
        words.join(" ")
    }

    /// The distinct colours of the shapes, in caption order.
    pub fn shape_colours(&self) -> Vec<Colour> {
        let mut colours: Vec<Colour> = Vec::new();
        for group in &self.shapes {
            if !colours.contains(&group.colour) {
                colours.push(group.colour);
            }
        }
        colours
    }

    pub fn shape_count(&self) -> usize {
        self.shapes.iter().map(|g| g.count as usize).sum()
    }
}

impl fmt::Display for CaptionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.caption())
    }
}

fn article(next_word: &str) -> &'static str {
    if next_word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn count_word(count: u8, next_word: &str) -> &'static str {
    match count {
        2 => "two",
        3 => "three",
        _ => article(next_word),
    }
}

/// Colour/shape pairs the sampler draws [`GrammarWeights::rare`] times as often as
/// the others, one per shape, so a pretrained model sees them rarely.
pub const RARE_COMBOS: [(Colour, ShapeKind); 7] = [
    (Colour::Orange, ShapeKind::Circle),
    (Colour::White, ShapeKind::Square),
    (Colour::Blue, ShapeKind::Triangle),
    (Colour::Purple, ShapeKind::Cross),
    (Colour::Yellow, ShapeKind::Ring),
    (Colour::Red, ShapeKind::Diamond),
    (Colour::Green, ShapeKind::Star),
];

pub fn is_rare(colour: Colour, kind: ShapeKind) -> bool {
    RARE_COMBOS.contains(&(colour, kind))
}

/// How often the grammar makes each choice.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrammarWeights {
    /// Probability of a two-colour split background.
    pub split_background: f64,
    /// Relative weights of the caption structures: one group of one, two or
    /// three shapes, ...
    pub counts: [f64; 3],
    /// ... two single shapes joined by a spatial relation, ...
    pub relation: f64,
    /// ... and two groups joined by "and". The five are normalised to sum to 1.
    pub and: f64,
    /// Relative weight of a [`RARE_COMBOS`] colour/shape pair (common pairs weigh 1).
    pub rare: f64,
}

impl GrammarWeights {
    /// Checks that every weight is a finite non-negative number, that the
    /// split probability is at most 1 and that some caption structure can occur.
    pub fn validate(&self) -> anyhow::Result<()> {
        let all = [
            self.split_background,
            self.counts[0],
            self.counts[1],
            self.counts[2],
            self.relation,
            self.and,
            self.rare,
        ];
        anyhow::ensure!(
            all.iter().all(|w| w.is_finite() && *w >= 0.0),
            "grammar weights must be finite and non-negative: {self:?}"
        );
        anyhow::ensure!(
            self.split_background <= 1.0,
            "split background probability must be at most 1, got {}",
            self.split_background
        );
        anyhow::ensure!(
            all[1..6].iter().sum::<f64>() > 0.0,
            "at least one caption structure weight must be positive: {self:?}"
        );
        Ok(())
    }
}

impl Default for GrammarWeights {
    fn default() -> Self {
        Self {
            split_background: 0.2,
            counts: [0.55, 0.12, 0.08],
            relation: 0.17,
            and: 0.08,
            rare: 0.1,
        }
    }
}

/// Draws a caption spec from the grammar.
pub(crate) fn sample_spec(rng: &mut impl Rng, weights: &GrammarWeights) -> CaptionSpec {
    let background = sample_background(rng, weights.split_background);
    let structure = [
        weights.counts[0],
        weights.counts[1],
        weights.counts[2],
        weights.relation,
        weights.and,
    ];
    let group = |rng: &mut _, count: u8, size: Size, avoid: &[(Colour, ShapeKind)]| {
        let (colour, kind) = sample_look(rng, &background, avoid, weights.rare);
        ShapeSpec {
            colour,
            kind,
            size,
            count,
        }
    };
    let (shapes, relation) = match weighted_index(rng, &structure) {
        i @ 0..=2 => {
            let count = i as u8 + 1;
            // Three large shapes do not fit side by side in the frame.
            let sizes: &[Size] = if count == 3 {
                &[Size::Small, Size::Medium]
            } else {
                &[Size::Small, Size::Medium, Size::Large]
            };
            let size = sizes[rng.random_range(0..sizes.len())];
            (vec![group(rng, count, size, &[])], None)
        }
        3 => {
            let first = group(rng, 1, Size::Medium, &[]);
            let second = group(rng, 1, Size::Medium, &[(first.colour, first.kind)]);
            let relation = Relation::ALL[rng.random_range(0..Relation::ALL.len())];
            (vec![first, second], Some(relation))
        }
        _ => {
            let count = if rng.random_bool(0.3) { 2 } else { 1 };
            let first = group(rng, count, Size::Medium, &[]);
            let second = group(rng, 1, Size::Medium, &[(first.colour, first.kind)]);
            (vec![first, second], None)
        }
    };
    CaptionSpec {
        background,
        shapes,
        relation,
    }
}

fn sample_background(rng: &mut impl Rng, split_probability: f64) -> Vec<Colour> {
    let first = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
    if !rng.random_bool(split_probability) {
        return vec![first];
    }
    let others: Vec<Colour> = Colour::ALL.into_iter().filter(|&c| c != first).collect();
    vec![first, others[rng.random_range(0..others.len())]]
}

/// A colour/shape pair whose colour differs from the background, weighted so
/// rare combos come up `rare_weight` times as often as common ones.
fn sample_look(
    rng: &mut impl Rng,
    background: &[Colour],
    avoid: &[(Colour, ShapeKind)],
    rare_weight: f64,
) -> (Colour, ShapeKind) {
    let candidates: Vec<(Colour, ShapeKind)> = Colour::ALL
        .into_iter()
        .filter(|c| !background.contains(c))
        .flat_map(|c| ShapeKind::ALL.into_iter().map(move |k| (c, k)))
        .filter(|look| !avoid.contains(look))
        .collect();
    let weights: Vec<f64> = candidates
        .iter()
        .map(|&(c, k)| {
            if is_rare(c, k) {
                rare_weight.max(0.0)
            } else {
                1.0
            }
        })
        .collect();
    candidates[weighted_index(rng, &weights)]
}

/// Index drawn with probability proportional to `weights` (uniform if they sum to 0).
fn weighted_index(rng: &mut impl Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return rng.random_range(0..weights.len());
    }
    let mut target = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if target < *w {
            return i;
        }
        target -= w;
    }
    weights.len() - 1
}

/// Parses any caption of the grammar (see the module docs) back into its spec;
/// `None` when the text is not a grammar caption. Case and punctuation are ignored.
pub fn parse_caption(text: &str) -> Option<CaptionSpec> {
    let words = super::tokenizer::split_words(text);
    let mut parser = Parser {
        words: &words,
        pos: 0,
    };
    let first = parser.group()?;
    let mut shapes = vec![first];
    let mut relation = None;
    if parser.peek() != Some("on") {
        relation = parser.relation();
        if relation.is_none() {
            parser.expect("and")?;
        }
        shapes.push(parser.group()?);
    }
    if relation.is_some() && shapes.iter().any(|g| g.count != 1) {
        return None;
    }
    parser.expect("on")?;
    parser.article()?;
    let mut background = vec![parser.colour()?];
    if parser.peek() == Some("and") {
        parser.pos += 1;
        background.push(parser.colour()?);
    }
    parser.expect("background")?;
    (parser.pos == words.len()).then_some(CaptionSpec {
        background,
        shapes,
        relation,
    })
}

struct Parser<'a> {
    words: &'a [String],
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&str> {
        self.words.get(self.pos).map(String::as_str)
    }

    fn next(&mut self) -> Option<&str> {
        let word = self.words.get(self.pos)?;
        self.pos += 1;
        Some(word)
    }

    fn expect(&mut self, word: &str) -> Option<()> {
        (self.next()? == word).then_some(())
    }

    fn article(&mut self) -> Option<()> {
        matches!(self.next()?, "a" | "an").then_some(())
    }

    fn colour(&mut self) -> Option<Colour> {
        Colour::from_name(self.next()?)
    }

    fn group(&mut self) -> Option<ShapeSpec> {
        let count = match self.next()? {
            "a" | "an" => 1,
            "two" => 2,
            "three" => 3,
            _ => return None,
        };
        let size = self.peek().and_then(Size::from_word);
        if size.is_some() {
            self.pos += 1;
        }
        let colour = self.colour()?;
        let (kind, plural) = ShapeKind::from_word(self.next()?)?;
        (plural == (count > 1)).then_some(ShapeSpec {
            colour,
            kind,
            size: size.unwrap_or(Size::Medium),
            count,
        })
    }

    fn relation(&mut self) -> Option<Relation> {
        let relation = match self.peek()? {
            "above" => Relation::Above,
            "below" => Relation::Below,
            "left" => Relation::LeftOf,
            "right" => Relation::RightOf,
            _ => return None,
        };
        self.pos += 1;
        if matches!(relation, Relation::LeftOf | Relation::RightOf) {
            self.expect("of")?;
        }
        Some(relation)
    }
}
