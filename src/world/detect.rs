//! An object detector for shapes-world images, rendered or generated: the background colour(s),
//! and each shape as an object with its palette colour, shape class, area, centroid and box.
//!
//! Pixels are labelled as the judge does ([`super::judge::unmix`]): a background colour plus
//! one shape colour and that colour's share of the pixel, so anti-aliased or blurred edges keep
//! their colour instead of reading as a third one. Objects are the 8-connected components of
//! pixels more than half one colour; the softer pixels around them join them for area and
//! centroid. Specks below [`MIN_OBJECT_AREA`], or far smaller than the image's largest object
//! ([`MIN_RELATIVE_AREA`]), are dropped as model noise, and so are fringes: components
//! mostly surrounded by other objects, which are blends along their edges.
//!
//! The shape class comes from fitting each shape's template (the world's own geometry, see
//! [`super::scene::covers`], and a thicker star and cross) at the object's centroid and area and
//! keeping the best overlap (IoU of coverage maps). A blob no template fits to
//! [`MIN_SHAPE_SCORE`], nor clearly better than the others ([`names_shape`]), has no class, the
//! way a detector finds no object in a smudge.

use std::sync::OnceLock;

use image::RgbImage;
use serde::Serialize;

use super::caption::ShapeKind;
use super::judge::{detect_background, unmix_within};
use super::palette::rgb_distance;
use super::palette::Colour;
use super::scene::{covers, in_cross, in_polygon, star};

/// A pixel is in an object's core when more than this share of it is the object's colour.
const CORE_SHARE: f32 = 0.5;
/// Softer pixels than this are background (noise or the faintest anti-aliasing).
const MIN_SHARE: f32 = 0.15;
/// Objects covering less area (in pixels of colour share) are specks, not shapes.
pub const MIN_OBJECT_AREA: f32 = 8.0;
/// Objects smaller than this share of the image's largest object are fragments of noise: the
/// world's shapes in one image differ in area by at most a factor of three.
pub const MIN_RELATIVE_AREA: f32 = 0.2;
/// The least template overlap (IoU) that names an object's shape whatever else fits.
pub const MIN_SHAPE_SCORE: f32 = 0.75;
/// A looser overlap that still names the shape when it beats every other shape's by
/// [`CLEAR_SHAPE_MARGIN`] (chosen on hand labels of the v5 default's samples; README).
pub const MIN_CLEAR_SHAPE_SCORE: f32 = 0.65;
pub const CLEAR_SHAPE_MARGIN: f32 = 0.05;
/// How far a pixel may lie from every background-to-colour blend and still be labelled.
const MAX_COLOUR_DISTANCE: f32 = 80.0;
/// Neighbours closer than this in RGB count as the same flat patch.
const FLAT_DISTANCE: f32 = 24.0;
/// A pixel with at least this many flat neighbours is inside a region, not on an edge.
const FLAT_NEIGHBOURS: usize = 6;
/// Subsamples per pixel side when painting a template.
const SUPERSAMPLE: usize = 4;

/// What the detector sees in one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detection {
    /// Background colours read from the border, most frequent first (two for a split background).
    pub background: Vec<Colour>,
    /// Objects, largest first.
    pub objects: Vec<Object>,
}

/// One shape found in an image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Object {
    pub colour: Colour,
    /// The best-fitting shape, or `None` for a blob no shape fits.
    pub shape: Option<ShapeKind>,
    /// The best shape's template overlap (IoU, 0..1), also when it is below the threshold.
    pub shape_score: f32,
    /// The shape that fit best, named even when `shape` is `None` (for diagnostics).
    pub best_fit: ShapeKind,
    /// Every shape's template overlap, in [`ShapeKind::ALL`]'s order.
    pub fits: [f32; 7],
    /// Area in pixels, counting edge pixels by their colour share.
    pub area: f32,
    /// Share-weighted centre (x, y) in pixel units, y down.
    pub centroid: (f32, f32),
    /// Inclusive pixel bounds of the core: [x0, y0, x1, y1].
    pub bbox: [u32; 4],
}

impl Object {
    /// How well `kind`'s template fits this object (IoU, 0..1), named or not.
    pub fn fit(&self, kind: ShapeKind) -> f32 {
        self.fits[kind as usize]
    }

    pub fn width(&self) -> f32 {
        (self.bbox[2] - self.bbox[0] + 1) as f32
    }

    pub fn height(&self) -> f32 {
        (self.bbox[3] - self.bbox[1] + 1) as f32
    }
}

impl Detection {
    /// Objects classified as `kind`.
    pub fn of_kind(&self, kind: ShapeKind) -> impl Iterator<Item = &Object> {
        self.objects.iter().filter(move |o| o.shape == Some(kind))
    }

    /// Objects classified as `kind` in `colour`.
    pub fn of_look(&self, kind: ShapeKind, colour: Colour) -> impl Iterator<Item = &Object> {
        self.of_kind(kind).filter(move |o| o.colour == colour)
    }
}

/// Detects the background and the objects of `img`.
pub fn detect(img: &RgbImage) -> Detection {
    let background = detect_background(img);
    let mut labels = Labels::new(img, &background);
    let cores = labels.components();
    let mut objects: Vec<Object> = cores
        .iter()
        .enumerate()
        .filter(|&(id, core)| !labels.is_fringe(id, core))
        .filter_map(|(_, core)| labels.blob(core).object())
        .collect();
    objects.sort_by(|a, b| b.area.total_cmp(&a.area));
    let largest = objects.first().map_or(0.0, |o| o.area);
    objects.retain(|o| o.area >= MIN_RELATIVE_AREA * largest);
    Detection { background, objects }
}

/// Each pixel's shape colour and share (None: background), row-major.
struct Labels {
    width: usize,
    height: usize,
    pixels: Vec<Option<(Colour, f32)>>,
    /// Which core component each pixel belongs to, if any.
    owner: Vec<Option<usize>>,
}

/// One connected component of core pixels.
struct Core {
    colour: Colour,
    members: Vec<usize>,
}

impl Labels {
    fn new(img: &RgbImage, background: &[Colour]) -> Labels {
        let (width, height) = (img.width() as usize, img.height() as usize);
        let mut labels = Labels { width, height, owner: vec![None; width * height], pixels: Vec::new() };
        labels.pixels = img.pixels().enumerate().map(|(i, p)| labels.label(img, i, p.0, background)).collect();
        labels
    }

    /// A pixel's shape colour and share. Inside a flat patch the pixel is its nearest colour
    /// outright: blends are for thin edges, and a flat orange patch on red is orange, not a
    /// half-yellow edge. Between two background colours, a blend of the two is background.
    fn label(&self, img: &RgbImage, i: usize, rgb: [u8; 3], background: &[Colour]) -> Option<(Colour, f32)> {
        let (nearest, distance) = Colour::nearest(rgb);
        if between_backgrounds(rgb, background) {
            return None;
        }
        let at = |n: usize| img.get_pixel((n % self.width) as u32, (n / self.width) as u32).0;
        let flat = || self.neighbours(i).filter(|&n| rgb_distance(at(n), rgb) < FLAT_DISTANCE).count();
        if !background.contains(&nearest) && distance <= MAX_COLOUR_DISTANCE && flat() >= FLAT_NEIGHBOURS {
            return Some((nearest, 1.0));
        }
        unmix_within(rgb, background, MAX_COLOUR_DISTANCE).filter(|&(_, share)| share >= MIN_SHARE)
    }

    fn is_core(&self, i: usize, colour: Colour) -> bool {
        self.pixels[i].is_some_and(|(c, s)| c == colour && s > CORE_SHARE)
    }

    /// The 8-neighbours of pixel `i` inside the image.
    fn neighbours(&self, i: usize) -> impl Iterator<Item = usize> {
        let (w, h) = (self.width as i64, self.height as i64);
        let (x, y) = (i as i64 % w, i as i64 / w);
        (-1..=1i64)
            .flat_map(move |dy| (-1..=1i64).map(move |dx| (x + dx, y + dy)))
            .filter(move |&(nx, ny)| (nx, ny) != (x, y) && nx >= 0 && ny >= 0 && nx < w && ny < h)
            .map(move |(nx, ny)| (ny * w + nx) as usize)
    }

    /// The core components, found by flood fill; records each core pixel's owner.
    fn components(&mut self) -> Vec<Core> {
        let mut cores = Vec::new();
        for start in 0..self.pixels.len() {
            let Some((colour, _)) = self.pixels[start] else { continue };
            if self.owner[start].is_some() || !self.is_core(start, colour) {
                continue;
            }
            self.owner[start] = Some(cores.len());
            let (mut stack, mut members) = (vec![start], Vec::new());
            while let Some(i) = stack.pop() {
                members.push(i);
                for n in self.neighbours(i) {
                    if self.owner[n].is_none() && self.is_core(n, colour) {
                        self.owner[n] = Some(cores.len());
                        stack.push(n);
                    }
                }
            }
            cores.push(Core { colour, members });
        }
        cores
    }

    /// Whether most of the pixels around a core belong to other objects: then it is a fringe of
    /// blended colour along another object's edge (red on yellow reads orange), not an object.
    /// The world's shapes never touch, so a real object is mostly ringed by background.
    fn is_fringe(&self, id: usize, core: &Core) -> bool {
        let mut around: std::collections::HashSet<usize> = std::collections::HashSet::new();
        for &i in &core.members {
            around.extend(self.neighbours(i).filter(|&n| self.owner[n] != Some(id)));
        }
        let others = around.iter().filter(|&&n| self.owner[n].is_some()).count();
        2 * others > around.len()
    }

    /// The core with its halo: the unowned pixels of its colour that touch it, with their shares.
    fn blob<'a>(&self, core: &'a Core) -> Blob<'a> {
        let share = |i: usize| self.pixels[i].map_or(0.0, |p| p.1);
        let mut soft: Vec<(usize, f32)> = core.members.iter().map(|&i| (i, share(i))).collect();
        let mut seen: std::collections::HashSet<usize> = core.members.iter().copied().collect();
        for &i in &core.members {
            for n in self.neighbours(i) {
                let same = self.pixels[n].is_some_and(|(c, _)| c == core.colour);
                if self.owner[n].is_none() && same && seen.insert(n) {
                    soft.push((n, share(n)));
                }
            }
        }
        Blob { colour: core.colour, width: self.width, core: &core.members, soft }
    }
}

/// Whether `rgb` is closer to a blend of the two background colours than to either blend of a
/// background colour with the pixel's nearest other colour (the seam of a split background).
fn between_backgrounds(rgb: [u8; 3], background: &[Colour]) -> bool {
    let [a, b] = background else { return false };
    let seam = segment_distance(rgb, a.rgb(), b.rgb());
    let (nearest, _) = Colour::ALL.into_iter().filter(|c| !background.contains(c)).map(|c| (c, rgb_distance(rgb, c.rgb()))).fold((Colour::Black, f32::MAX), |m, x| if x.1 < m.1 { x } else { m });
    let shape = background.iter().map(|bg| segment_distance(rgb, bg.rgb(), nearest.rgb())).fold(f32::MAX, f32::min);
    seam < shape
}

/// Distance from `p` to the RGB segment from `a` to `b`.
fn segment_distance(p: [u8; 3], a: [u8; 3], b: [u8; 3]) -> f32 {
    let (p, a, b) = (p.map(f32::from), a.map(f32::from), b.map(f32::from));
    let d = [0, 1, 2].map(|i| b[i] - a[i]);
    let t = ((0..3).map(|i| (p[i] - a[i]) * d[i]).sum::<f32>() / (0..3).map(|i| d[i] * d[i]).sum::<f32>()).clamp(0.0, 1.0);
    (0..3).map(|i| (a[i] + t * d[i] - p[i]).powi(2)).sum::<f32>().sqrt()
}

/// A component's pixels, each with its share of the component's colour.
struct Blob<'a> {
    colour: Colour,
    /// Image width, to turn pixel indices into coordinates.
    width: usize,
    core: &'a [usize],
    /// (pixel index, share) of core and halo pixels.
    soft: Vec<(usize, f32)>,
}

impl Blob<'_> {
    fn xy(&self, i: usize) -> (usize, usize) {
        (i % self.width, i / self.width)
    }

    /// The object, unless the blob is a speck.
    fn object(&self) -> Option<Object> {
        let area: f32 = self.soft.iter().map(|p| p.1).sum();
        if area < MIN_OBJECT_AREA {
            return None;
        }
        let weighted = |axis: fn((usize, usize)) -> usize| {
            self.soft.iter().map(|&(i, s)| s * (axis(self.xy(i)) as f32 + 0.5)).sum::<f32>() / area
        };
        let centroid = (weighted(|p| p.0), weighted(|p| p.1));
        let (xs, ys): (Vec<usize>, Vec<usize>) = self.core.iter().map(|&i| self.xy(i)).unzip();
        let bbox = [xs.iter().min(), ys.iter().min(), xs.iter().max(), ys.iter().max()].map(|v| *v.expect("a core has pixels") as u32);
        let coverage = Coverage::new(&self.soft, self.width);
        let fits = ShapeKind::ALL.map(|kind| coverage.fit(kind, area, centroid));
        let (best_fit, shape_score) = ShapeKind::ALL
            .into_iter()
            .zip(fits)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("there are shape kinds");
        let runner_up = ShapeKind::ALL.into_iter().zip(fits).filter(|&(k, _)| k != best_fit).map(|p| p.1).fold(0.0, f32::max);
        let shape = names_shape(shape_score, runner_up).then_some(best_fit);
        Some(Object { colour: self.colour, shape, shape_score, best_fit, fits, area, centroid, bbox })
    }
}

/// Whether a best template overlap names the shape: a close fit, or a looser one well ahead of
/// every other shape's. A small shape drawn softly (a star with short points, a cross with wide
/// arms) overlaps its template less than a crisp one, yet still looks like that shape more than
/// any other; a shapeless blob fits several templates about equally.
fn names_shape(best: f32, runner_up: f32) -> bool {
    best >= MIN_SHAPE_SCORE || (best >= MIN_CLEAR_SHAPE_SCORE && best - runner_up >= CLEAR_SHAPE_MARGIN)
}

/// A blob's shares on a dense local grid, for overlap with templates.
struct Coverage {
    /// Top-left pixel of the grid.
    origin: (i64, i64),
    cols: i64,
    rows: i64,
    share: Vec<f32>,
    total: f32,
}

impl Coverage {
    fn new(soft: &[(usize, f32)], width: usize) -> Coverage {
        let xy = |i: usize| ((i % width) as i64, (i / width) as i64);
        let (x0, y0) = soft.iter().map(|&(i, _)| xy(i)).fold((i64::MAX, i64::MAX), |a, p| (a.0.min(p.0), a.1.min(p.1)));
        let (x1, y1) = soft.iter().map(|&(i, _)| xy(i)).fold((i64::MIN, i64::MIN), |a, p| (a.0.max(p.0), a.1.max(p.1)));
        let (cols, rows) = (x1 - x0 + 1, y1 - y0 + 1);
        let mut share = vec![0.0; (cols * rows) as usize];
        for &(i, s) in soft {
            let (x, y) = xy(i);
            share[((y - y0) * cols + x - x0) as usize] = s;
        }
        Coverage { origin: (x0, y0), cols, rows, share, total: soft.iter().map(|p| p.1).sum() }
    }

    fn at(&self, x: i64, y: i64) -> f32 {
        let (gx, gy) = (x - self.origin.0, y - self.origin.1);
        if gx < 0 || gy < 0 || gx >= self.cols || gy >= self.rows {
            return 0.0;
        }
        self.share[(gy * self.cols + gx) as usize]
    }

    /// The best overlap of `kind`'s template with the blob: sized to the blob's area and centred
    /// on its centroid, then nudged by up to half a pixel and 10% in size, since blur and the
    /// pixel grid shift both.
    fn fit(&self, kind: ShapeKind, area: f32, centroid: (f32, f32)) -> f32 {
        Outline::of(kind).map(|outline| self.fit_outline(outline, area, centroid)).fold(0.0, f32::max)
    }

    fn fit_outline(&self, outline: Outline, area: f32, centroid: (f32, f32)) -> f32 {
        let template = template(outline);
        let radius = (area / template.area).sqrt();
        let centre = (centroid.0 - radius * template.centroid.0, centroid.1 - radius * template.centroid.1);
        let mut best = 0.0f32;
        for scale in [0.9, 1.0, 1.1] {
            for dy in [-0.5, 0.0, 0.5] {
                for dx in [-0.5, 0.0, 0.5] {
                    best = best.max(self.iou(outline, (centre.0 + dx, centre.1 + dy), radius * scale));
                }
            }
        }
        best
    }

    /// Soft intersection over union of the blob and `kind` painted at `centre` with `radius`.
    fn iou(&self, outline: Outline, centre: (f32, f32), radius: f32) -> f32 {
        let (lo_x, hi_x) = ((centre.0 - radius).floor() as i64, (centre.0 + radius).ceil() as i64);
        let (lo_y, hi_y) = ((centre.1 - radius).floor() as i64, (centre.1 + radius).ceil() as i64);
        let (mut inter, mut painted) = (0.0f32, 0.0f32);
        let step = 1.0 / SUPERSAMPLE as f32;
        for y in lo_y..=hi_y {
            for x in lo_x..=hi_x {
                let mut hits = 0;
                for sy in 0..SUPERSAMPLE {
                    for sx in 0..SUPERSAMPLE {
                        let u = (x as f32 + (sx as f32 + 0.5) * step - centre.0) / radius;
                        let v = (y as f32 + (sy as f32 + 0.5) * step - centre.1) / radius;
                        hits += outline.covers(u, v) as usize;
                    }
                }
                let t = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
                painted += t;
                inter += t.min(self.at(x, y));
            }
        }
        let union = self.total + painted - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }
}

/// A shape's area and centroid in units of its radius, for sizing and centring its template.
#[derive(Clone, Copy, Debug)]
struct Template {
    area: f32,
    centroid: (f32, f32),
}

/// An outline a shape is fitted with: the world's own, or a thick one. The model draws small
/// stars and crosses thicker than the world does (the star's points short, its inner corners
/// filled; the cross's arms wide), and a thick star still fits a star better than a diamond.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Outline {
    kind: ShapeKind,
    thick: bool,
}

/// The thick star's inner radius (the world's is 0.45) and the thick cross's arm half-width
/// (the world's is `scene::CROSS_ARM`, 0.3).
const THICK_STAR_INNER: f32 = 0.6;
const THICK_CROSS_ARM: f32 = 0.35;

impl Outline {
    /// The outlines `kind` is fitted with.
    fn of(kind: ShapeKind) -> impl Iterator<Item = Outline> {
        let thick = matches!(kind, ShapeKind::Star | ShapeKind::Cross);
        std::iter::once(Outline { kind, thick: false }).chain(thick.then_some(Outline { kind, thick: true }))
    }

    fn covers(self, u: f32, v: f32) -> bool {
        match (self.kind, self.thick) {
            (ShapeKind::Star, true) => {
                static THICK_STAR: OnceLock<[(f32, f32); 10]> = OnceLock::new();
                in_polygon(THICK_STAR.get_or_init(|| star(THICK_STAR_INNER)), u, v)
            }
            (ShapeKind::Cross, true) => in_cross(THICK_CROSS_ARM, u, v),
            _ => covers(self.kind, u, v),
        }
    }
}

/// The template of `outline`, measured once on a fine grid over the shape's square.
fn template(outline: Outline) -> Template {
    static TEMPLATES: OnceLock<Vec<(Outline, Template)>> = OnceLock::new();
    let all = TEMPLATES.get_or_init(|| ShapeKind::ALL.into_iter().flat_map(Outline::of).map(|o| (o, measure(o))).collect());
    all.iter().find(|(o, _)| *o == outline).expect("every outline is measured").1
}

fn measure(outline: Outline) -> Template {
    const N: usize = 400;
    let cell = 2.0 / N as f32;
    let (mut count, mut sx, mut sy) = (0usize, 0.0f32, 0.0f32);
    for j in 0..N {
        for i in 0..N {
            let (u, v) = (-1.0 + (i as f32 + 0.5) * cell, -1.0 + (j as f32 + 0.5) * cell);
            if outline.covers(u, v) {
                count += 1;
                sx += u;
                sy += v;
            }
        }
    }
    let n = count.max(1) as f32;
    Template { area: n * cell * cell, centroid: (sx / n, sy / n) }
}
