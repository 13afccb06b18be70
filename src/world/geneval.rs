//! GenEval-style scoring of a [`Detection`] against a prompt's clauses: strict correctness (every
//! clause right) and Flow-GRPO's partial credit, with the verdict on each clause.
//!
//! Clauses follow GenEval's `include` entries: per group a shape class with an exact count
//! (Flow-GRPO's `strict_correct`), optionally a colour, optionally a position of the first group
//! relative to the second; plus the shapes world's background. Objects of unnamed classes are
//! ignored, as in GenEval.
//!
//! Partial credit (Flow-GRPO's reward server): the mean of the clause terms, where a count term
//! is `1 - |n - N| / n` for `n` asked and `N` detected (negative beyond `2n`, unfloored as
//! there), and a group's colour and position terms are 0 unless its count is right.
//!
//! Shape fit (a dense term beside the verdicts, not part of either score): how well the objects
//! a caption asks for are drawn, the mean over asked objects of their class template's overlap,
//! so a soft star that the detector reads as a blob still earns most of its credit.

use anyhow::Context;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::caption::{parse_caption, CaptionSpec, Relation, ShapeKind};
use super::detect::{detect, Detection, Object};
use super::palette::Colour;

/// GenEval's margin: an offset counts only beyond this fraction of the two objects' summed sizes.
const POSITION_MARGIN: f32 = 0.1;

/// What a prompt asks for, in GenEval's terms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clauses {
    /// The background colours as a set; `None` leaves the background unscored.
    pub background: Option<Vec<Colour>>,
    pub groups: Vec<Group>,
    /// Where `groups[0]` stands relative to `groups[1]`.
    pub relation: Option<Relation>,
}

/// A group of objects of one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub kind: ShapeKind,
    pub count: u8,
    /// The colour every object of the group must have; `None` leaves colour unscored.
    pub colour: Option<Colour>,
}

impl Clauses {
    /// Every clause a caption states: each group's class, count and colour, the relation and
    /// the background (sizes are not scored).
    pub fn from_spec(spec: &CaptionSpec) -> Clauses {
        let groups = spec.shapes.iter().map(|g| Group { kind: g.kind, count: g.count, colour: Some(g.colour) }).collect();
        Clauses { background: Some(spec.background.clone()), groups, relation: spec.relation }
    }
}

/// Which kind of clause a verdict is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClauseKind {
    /// A group's class and count.
    Count,
    Colour,
    Position,
    Background,
}

impl ClauseKind {
    pub const ALL: [ClauseKind; 4] = [ClauseKind::Count, ClauseKind::Colour, ClauseKind::Position, ClauseKind::Background];

    pub fn name(self) -> &'static str {
        match self {
            ClauseKind::Count => "count",
            ClauseKind::Colour => "colour",
            ClauseKind::Position => "position",
            ClauseKind::Background => "background",
        }
    }
}

/// The verdict on one clause.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub kind: ClauseKind,
    /// The group the clause is about (the first group for a position).
    pub group: Option<usize>,
    pub ok: bool,
    /// This clause's term of the partial score.
    pub credit: f64,
    /// What was asked and what was found, e.g. "2 circle: found 1".
    pub detail: String,
}

/// Strict and partial scores of one image, with the verdict on each clause.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Score {
    /// Every clause right.
    pub strict: bool,
    /// The mean of the clause terms (see the module docs).
    pub partial: f64,
    /// The mean template overlap of the asked objects (see the module docs), 0..1.
    pub shape_fit: f64,
    pub verdicts: Vec<Verdict>,
}

/// Detects the objects of `img` and scores them against `prompt`, a shapes-world caption.
pub fn geneval(img: &RgbImage, prompt: &str) -> anyhow::Result<Score> {
    let spec = parse_caption(prompt).with_context(|| {
        format!("{prompt:?} is not a shapes-world caption; give one such as \"two red circles on a blue background\"")
    })?;
    Ok(score(&Clauses::from_spec(&spec), &detect(img)))
}

/// Scores a detection against clauses.
pub fn score(clauses: &Clauses, det: &Detection) -> Score {
    let mut verdicts = Vec::new();
    for (i, group) in clauses.groups.iter().enumerate() {
        let count = count_verdict(clauses, i, det);
        let counted = count.ok;
        verdicts.push(count);
        if let Some(colour) = group.colour {
            verdicts.push(colour_verdict(group, colour, i, counted, det));
        }
    }
    if let (Some(relation), [a, b, ..]) = (clauses.relation, clauses.groups.as_slice()) {
        let counted = verdicts.iter().filter(|v| v.kind == ClauseKind::Count).take(2).all(|v| v.ok);
        verdicts.push(position_verdict(relation, a, b, counted, det));
    }
    if let Some(background) = &clauses.background {
        verdicts.push(background_verdict(background, &det.background));
    }
    let partial = verdicts.iter().map(|v| v.credit).sum::<f64>() / verdicts.len().max(1) as f64;
    Score { strict: verdicts.iter().all(|v| v.ok), partial, shape_fit: shape_fit(&clauses.groups, det), verdicts }
}

/// Per group, the `count` best overlaps with the group's class template among the objects of
/// its colour (named or blobs), missing ones counting 0; the mean over every asked object.
fn shape_fit(groups: &[Group], det: &Detection) -> f64 {
    let asked: usize = groups.iter().map(|g| g.count as usize).sum();
    let total: f64 = groups
        .iter()
        .map(|g| {
            let mut fits: Vec<f32> = det.objects.iter().filter(|o| in_colour(g, o)).map(|o| o.fit(g.kind)).collect();
            fits.sort_by(|a, b| b.total_cmp(a));
            fits.iter().take(g.count as usize).map(|&f| f as f64).sum::<f64>()
        })
        .sum();
    total / asked.max(1) as f64
}

/// `1 - |asked - found| / asked`, Flow-GRPO's count credit.
fn count_credit(asked: usize, found: usize) -> f64 {
    1.0 - (asked as f64 - found as f64).abs() / asked.max(1) as f64
}

/// Group `i`'s class count: objects of its class against the groups of that class together
/// (two groups of one class in two colours share the class's detections).
fn count_verdict(clauses: &Clauses, i: usize, det: &Detection) -> Verdict {
    let kind = clauses.groups[i].kind;
    let asked: usize = clauses.groups.iter().filter(|g| g.kind == kind).map(|g| g.count as usize).sum();
    let found = det.of_kind(kind).count();
    Verdict {
        kind: ClauseKind::Count,
        group: Some(i),
        ok: found == asked,
        credit: count_credit(asked, found),
        detail: format!("{asked} {kind}: found {found}"),
    }
}

fn colour_verdict(group: &Group, colour: Colour, i: usize, counted: bool, det: &Detection) -> Verdict {
    let found = det.of_look(group.kind, colour).count();
    let asked = group.count as usize;
    let ok = counted && found == asked;
    Verdict {
        kind: ClauseKind::Colour,
        group: Some(i),
        ok,
        credit: if counted { count_credit(asked, found) } else { 0.0 },
        detail: format!("{asked} {colour} {}: found {found}", group.kind),
    }
}

/// The objects a group refers to: its class, in its colour when it names one.
fn members<'a>(group: &Group, det: &'a Detection) -> Vec<&'a Object> {
    det.of_kind(group.kind).filter(|o| in_colour(group, o)).collect()
}

/// Whether `o` has the group's colour, or the group names none.
fn in_colour(group: &Group, o: &Object) -> bool {
    group.colour.is_none_or(|c| o.colour == c)
}

/// Every object of group `a` must stand in `relation` to every object of group `b`.
fn position_verdict(relation: Relation, a: &Group, b: &Group, counted: bool, det: &Detection) -> Verdict {
    let (first, second) = (members(a, det), members(b, det));
    let holds = !first.is_empty()
        && !second.is_empty()
        && first.iter().all(|x| second.iter().all(|y| relations(x, y).contains(&relation)));
    let ok = counted && holds;
    Verdict {
        kind: ClauseKind::Position,
        group: Some(0),
        ok,
        credit: if ok { 1.0 } else { 0.0 },
        detail: format!("{} {} {}: {}", a.kind, relation.words(), b.kind, if holds { "holds" } else { "does not hold" }),
    }
}

fn background_verdict(asked: &[Colour], found: &[Colour]) -> Verdict {
    let ok = asked.iter().all(|c| found.contains(c)) && found.iter().all(|c| asked.contains(c));
    let names = |cs: &[Colour]| cs.iter().map(|c| c.name()).collect::<Vec<_>>().join(" and ");
    Verdict {
        kind: ClauseKind::Background,
        group: None,
        ok,
        credit: if ok { 1.0 } else { 0.0 },
        detail: format!("{}: found {}", names(asked), names(found)),
    }
}

/// Where `a` stands relative to `b`, GenEval's `relative_position` on centroids and boxes: the
/// centre offset, shrunk per axis by a margin of the objects' sizes, names the sides whose
/// share of the offset exceeds one half.
pub fn relations(a: &Object, b: &Object) -> Vec<Relation> {
    let offset = [a.centroid.0 - b.centroid.0, a.centroid.1 - b.centroid.1];
    let dims = [a.width() + b.width(), a.height() + b.height()];
    let revised = [0, 1].map(|i| (offset[i].abs() - POSITION_MARGIN * dims[i]).max(0.0) * offset[i].signum());
    let norm = offset[0].hypot(offset[1]);
    if revised.iter().all(|r| r.abs() < 1e-3) || norm == 0.0 {
        return Vec::new();
    }
    let (dx, dy) = (revised[0] / norm, revised[1] / norm);
    let sides = [(dx < -0.5, Relation::LeftOf), (dx > 0.5, Relation::RightOf), (dy < -0.5, Relation::Above), (dy > 0.5, Relation::Below)];
    sides.into_iter().filter(|s| s.0).map(|s| s.1).collect()
}
