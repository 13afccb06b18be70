//! Scenes: where the shapes of a caption go in the frame, and how they are painted.
//!
//! Layout is rejection sampling: shapes get random centres until no two
//! bounding boxes touch and the caption's relation (if any) holds. Painting
//! supersamples each pixel on an n x n grid, so edges are anti-aliased by coverage.

use super::caption::{CaptionSpec, Relation, ShapeKind, Size};
use super::palette::Colour;
use image::{Rgb, RgbImage};
use rand::Rng;

/// How a two-colour background is split into halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// First colour on the left half.
    LeftRight,
    /// First colour on the top half.
    TopBottom,
}

/// One shape in the frame; it lies inside the square of half-width `radius`
/// around `centre` (pixel units, y down).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlacedShape {
    pub kind: ShapeKind,
    pub colour: Colour,
    pub centre: (f32, f32),
    pub radius: f32,
}

/// A fully laid-out image: background and placed shapes, painted in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub size: u32,
    pub background: Vec<Colour>,
    pub split: Split,
    pub shapes: Vec<PlacedShape>,
}

/// Layout attempts before the shapes are shrunk to make room.
const ATTEMPTS_PER_SCALE: usize = 200;
/// How often the shapes may shrink (by [`SHRINK`]) before a layout is
/// accepted even if it breaks a constraint.
const MAX_SHRINKS: usize = 10;
const SHRINK: f32 = 0.9;

/// Half-width in pixels of a shape in a `side`-pixel image. The constant part
/// keeps small shapes recognisable at 16 px without changing their order.
fn radius(size: Size, side: f32) -> f32 {
    match size {
        Size::Small => 0.6 + 0.09 * side,
        Size::Medium => 0.8 + 0.135 * side,
        Size::Large => 1.0 + 0.2 * side,
    }
}

impl Scene {
    /// Places the shapes of `spec` in a `size` x `size` frame.
    pub fn layout(spec: &CaptionSpec, size: u32, rng: &mut impl Rng) -> Scene {
        let split = if rng.random_bool(0.5) {
            Split::LeftRight
        } else {
            Split::TopBottom
        };
        let extent = size as f32;
        let mut shapes: Vec<PlacedShape> = Vec::new();
        for group in &spec.shapes {
            for _ in 0..group.count {
                let radius = radius(group.size, extent) * rng.random_range(0.92..1.08);
                shapes.push(PlacedShape {
                    kind: group.kind,
                    colour: group.colour,
                    centre: (0.0, 0.0),
                    radius,
                });
            }
        }
        // Keeps anti-aliased edges off the border pixels, which the judge reads as background.
        let margin = 1.0 + 0.03 * extent;
        'search: for _ in 0..=MAX_SHRINKS {
            for _ in 0..ATTEMPTS_PER_SCALE {
                for shape in &mut shapes {
                    let (lo, hi) = (shape.radius + margin, extent - shape.radius - margin);
                    let mut coordinate = || {
                        if hi > lo {
                            rng.random_range(lo..hi)
                        } else {
                            extent / 2.0
                        }
                    };
                    shape.centre = (coordinate(), coordinate());
                }
                if layout_ok(&shapes, spec.relation) {
                    break 'search;
                }
            }
            // Crowded (three shapes at 16 px): make room rather than overlap.
            shapes.iter_mut().for_each(|s| s.radius *= SHRINK);
        }
        Scene {
            size,
            background: spec.background.clone(),
            split,
            shapes,
        }
    }

    /// Paints the scene, averaging `supersample`² subsamples per pixel.
    pub fn render(&self, supersample: u32) -> RgbImage {
        let n = supersample.max(1);
        let step = 1.0 / n as f32;
        RgbImage::from_fn(self.size, self.size, |px, py| {
            let mut sum = [0.0f32; 3];
            for sy in 0..n {
                for sx in 0..n {
                    let x = px as f32 + (sx as f32 + 0.5) * step;
                    let y = py as f32 + (sy as f32 + 0.5) * step;
                    for (s, c) in sum.iter_mut().zip(self.colour_at(x, y).rgb()) {
                        *s += c as f32;
                    }
                }
            }
            Rgb(sum.map(|s| (s / (n * n) as f32).round() as u8))
        })
    }

    /// The colour at point (x, y): the last shape covering it, else the background.
    pub fn colour_at(&self, x: f32, y: f32) -> Colour {
        self.shapes
            .iter()
            .rev()
            .find(|s| {
                covers(
                    s.kind,
                    (x - s.centre.0) / s.radius,
                    (y - s.centre.1) / s.radius,
                )
            })
            .map_or_else(|| self.background_at(x, y), |s| s.colour)
    }

    fn background_at(&self, x: f32, y: f32) -> Colour {
        let half = self.size as f32 / 2.0;
        let second_half = match self.split {
            Split::LeftRight => x >= half,
            Split::TopBottom => y >= half,
        };
        match self.background.as_slice() {
            [_, second, ..] if second_half => *second,
            [first, ..] => *first,
            [] => Colour::Black,
        }
    }
}

fn layout_ok(shapes: &[PlacedShape], relation: Option<Relation>) -> bool {
    let apart = shapes
        .iter()
        .enumerate()
        .all(|(i, a)| shapes[i + 1..].iter().all(|b| boxes_apart(a, b)));
    let related = match (relation, shapes) {
        (Some(rel), [a, b, ..]) => relation_holds(a, b, rel),
        _ => true,
    };
    apart && related
}

/// True when the bounding boxes of `a` and `b` are at least a pixel apart.
fn boxes_apart(a: &PlacedShape, b: &PlacedShape) -> bool {
    let reach = a.radius + b.radius + 1.0;
    (a.centre.0 - b.centre.0).abs() >= reach || (a.centre.1 - b.centre.1).abs() >= reach
}

/// Whether `a` stands in `relation` to `b`: entirely beyond it along the
/// relation's axis, and more offset along that axis than across it.
pub fn relation_holds(a: &PlacedShape, b: &PlacedShape, relation: Relation) -> bool {
    let (dx, dy) = (b.centre.0 - a.centre.0, b.centre.1 - a.centre.1);
    let reach = a.radius + b.radius;
    // `along` > 0 when a is on the named side of b.
    let (along, across) = match relation {
        Relation::Above => (dy, dx),
        Relation::Below => (-dy, dx),
        Relation::LeftOf => (dx, dy),
        Relation::RightOf => (-dx, dy),
    };
    along > reach && along > across.abs()
}

/// Whether a shape of `kind` covers the point (u, v) given in units of its
/// radius from its centre (y down). Every shape fits the square [-1, 1]².
pub fn covers(kind: ShapeKind, u: f32, v: f32) -> bool {
    if u.abs() > 1.0 || v.abs() > 1.0 {
        return false;
    }
    let r2 = u * u + v * v;
    match kind {
        ShapeKind::Circle => r2 <= 1.0,
        ShapeKind::Square => u.abs() <= 0.82 && v.abs() <= 0.82,
        ShapeKind::Ring => (0.25..=1.0).contains(&r2),
        ShapeKind::Cross => in_cross(CROSS_ARM, u, v),
        ShapeKind::Diamond => u.abs() + v.abs() <= 1.0,
        ShapeKind::Triangle => in_polygon(&[(0.0, -1.0), (0.95, 0.7), (-0.95, 0.7)], u, v),
        ShapeKind::Star => in_polygon(&STAR, u, v),
    }
}

/// The cross's arm half-width, in units of its radius.
pub(crate) const CROSS_ARM: f32 = 0.3;

/// Whether a plus-shaped cross with arms of half-width `arm` and reach 0.95 covers (u, v).
pub(crate) fn in_cross(arm: f32, u: f32, v: f32) -> bool {
    (u.abs() <= arm && v.abs() <= 0.95) || (v.abs() <= arm && u.abs() <= 0.95)
}

/// A five-pointed star, point up, outer radius 1 and the given inner radius: vertex k is
/// (sin, -cos) of k * 36 degrees, times 1 for even k and `inner` for odd k.
pub(crate) fn star(inner: f32) -> [(f32, f32); 10] {
    std::array::from_fn(|k| {
        let (angle, r) = ((k as f32 * 36.0).to_radians(), if k % 2 == 0 { 1.0 } else { inner });
        (r * angle.sin(), -r * angle.cos())
    })
}

/// The world's star: `star(0.45)` to four decimals, kept as literals so that renders (and the
/// goldens made from them) never move with a platform's `sin`.
const STAR: [(f32, f32); 10] = [
    (0.0, -1.0),
    (0.2645, -0.3641),
    (0.9511, -0.3090),
    (0.4280, 0.1391),
    (0.5878, 0.8090),
    (0.0, 0.45),
    (-0.5878, 0.8090),
    (-0.4280, 0.1391),
    (-0.9511, -0.3090),
    (-0.2645, -0.3641),
];

/// Even-odd ray casting test of (u, v) against a closed polygon.
pub(crate) fn in_polygon(vertices: &[(f32, f32)], u: f32, v: f32) -> bool {
    let mut inside = false;
    let mut j = vertices.len() - 1;
    for i in 0..vertices.len() {
        let ((xi, yi), (xj, yj)) = (vertices[i], vertices[j]);
        if (yi > v) != (yj > v) && u < (xj - xi) * (v - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

#[cfg(test)]
mod tests {
    /// The world's literal star is the general star at inner radius 0.45, to its four decimals.
    #[test]
    fn the_world_star_is_star_at_inner_radius_045() {
        for (literal, computed) in super::STAR.iter().zip(super::star(0.45)) {
            assert!((literal.0 - computed.0).abs() < 1e-4 && (literal.1 - computed.1).abs() < 1e-4, "{literal:?} vs {computed:?}");
        }
    }
}
