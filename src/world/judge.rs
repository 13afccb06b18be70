//! A pixel-level judge of whether an image follows a caption: is the background
//! the captioned colour(s), and is the dominant shape colour one the caption names?
//!
//! Every pixel is named by its nearest palette colour. The background is read
//! from the border pixels (shapes never touch the border). Shape colours are
//! measured by area: each non-background pixel is unmixed into a background
//! colour plus one shape colour, which gets credit for its share. Naming edge
//! pixels by nearest colour alone would be wrong, because anti-aliased blends
//! of two palette colours can land near a third (red/yellow edges look orange).

use super::caption::CaptionSpec;
use super::palette::Colour;
use image::RgbImage;
use std::collections::HashMap;

/// A non-background pixel farther than this from every blend of a background
/// colour with another palette colour is noise and credits no shape colour.
/// About half the distance between the closest palette pair.
const MAX_COLOUR_DISTANCE: f32 = 48.0;

/// The least share of border pixels that makes a colour part of the background.
const MIN_BACKGROUND_SHARE: f32 = 0.25;

/// The least area, in pixels, that makes a colour count as a shape colour.
const MIN_SHAPE_AREA: f32 = 3.0;

/// The judge's verdict on one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// The detected background colours equal the caption's, as a set.
    pub background_ok: bool,
    /// The shape colour covering the most area is one of the caption's.
    pub shape_colour_ok: bool,
    /// Background colours found on the border, most frequent first.
    pub detected_background: Vec<Colour>,
    /// Shape colours by the area they cover (at least 3 pixels), largest first.
    pub detected_shape_colours: Vec<Colour>,
}

impl Judgement {
    pub fn passed(&self) -> bool {
        self.background_ok && self.shape_colour_ok
    }
}

/// Judges `img` against the caption meaning `spec`.
pub fn judge(img: &RgbImage, spec: &CaptionSpec) -> Judgement {
    let detected_background = detect_background(img);
    let mut background = detected_background.clone();
    background.extend(
        spec.background
            .iter()
            .filter(|c| !detected_background.contains(c)),
    );
    let detected_shape_colours = detect_shape_colours(img, &background);
    let background_ok = same_set(&detected_background, &spec.background);
    let shape_colour_ok = detected_shape_colours
        .first()
        .is_some_and(|c| spec.shape_colours().contains(c));
    Judgement {
        background_ok,
        shape_colour_ok,
        detected_background,
        detected_shape_colours,
    }
}

/// The most frequent border colour, plus the runner-up when it covers a
/// sizeable share of the border (a split background).
pub fn detect_background(img: &RgbImage) -> Vec<Colour> {
    let (w, h) = img.dimensions();
    let border = (0..w)
        .flat_map(|x| [(x, 0), (x, h.saturating_sub(1))])
        .chain((0..h).flat_map(|y| [(0, y), (w.saturating_sub(1), y)]));
    let names = border.map(|(x, y)| Colour::nearest(img.get_pixel(x, y).0).0);
    let ranked = rank(names);
    let total: usize = ranked.iter().map(|(_, n)| n).sum();
    ranked
        .iter()
        .take(2)
        .enumerate()
        .filter(|&(i, &(_, n))| i == 0 || n as f32 >= MIN_BACKGROUND_SHARE * total as f32)
        .map(|(_, &(c, _))| c)
        .collect()
}

/// Shape colours by the area they cover, largest first, each covering at
/// least [`MIN_SHAPE_AREA`] pixels. Pixels nearest a background colour are
/// background; every other pixel is unmixed into a background colour and one
/// shape colour, which is credited with its share of the pixel.
fn detect_shape_colours(img: &RgbImage, background: &[Colour]) -> Vec<Colour> {
    let mut area: Vec<(Colour, f32)> = Vec::new();
    for pixel in img.pixels() {
        if background.contains(&Colour::nearest(pixel.0).0) {
            continue;
        }
        let Some((colour, share)) = unmix(pixel.0, background) else {
            continue;
        };
        match area.iter_mut().find(|(c, _)| *c == colour) {
            Some((_, total)) => *total += share,
            None => area.push((colour, share)),
        }
    }
    area.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    area.into_iter()
        .filter(|&(_, a)| a >= MIN_SHAPE_AREA)
        .map(|(c, _)| c)
        .collect()
}

/// Explains `rgb` as a blend of a background colour and another palette
/// colour: that colour and its share in [0, 1], for the closest such blend
/// within [`MAX_COLOUR_DISTANCE`]; `None` when no blend is that close.
pub fn unmix(rgb: [u8; 3], background: &[Colour]) -> Option<(Colour, f32)> {
    unmix_within(rgb, background, MAX_COLOUR_DISTANCE)
}

/// [`unmix`] with its own tolerance: the detector ([`super::detect`]) allows more, since
/// generated colours drift further from the palette than rendered ones.
pub fn unmix_within(rgb: [u8; 3], background: &[Colour], max_distance: f32) -> Option<(Colour, f32)> {
    let p = rgb.map(f32::from);
    let blends = background.iter().flat_map(|&bg| {
        Colour::ALL
            .into_iter()
            .filter(|c| !background.contains(c))
            .map(move |c| (bg, c))
    });
    blends
        .map(|(bg, colour)| {
            let (b, s) = (bg.rgb().map(f32::from), colour.rgb().map(f32::from));
            // Closest point to p on the segment from the background (share 0) to the colour (share 1).
            let d = [0, 1, 2].map(|i| s[i] - b[i]);
            let along: f32 = (0..3).map(|i| (p[i] - b[i]) * d[i]).sum::<f32>()
                / (0..3).map(|i| d[i] * d[i]).sum::<f32>();
            let share = along.clamp(0.0, 1.0);
            let distance = (0..3)
                .map(|i| (b[i] + share * d[i] - p[i]).powi(2))
                .sum::<f32>()
                .sqrt();
            (colour, share, distance)
        })
        .filter(|&(_, _, distance)| distance <= max_distance)
        .min_by(|a, b| a.2.total_cmp(&b.2))
        .map(|(colour, share, _)| (colour, share))
}

/// Distinct colours with their counts, most frequent first (ties in palette order).
fn rank(colours: impl Iterator<Item = Colour>) -> Vec<(Colour, usize)> {
    let mut counts: HashMap<Colour, usize> = HashMap::new();
    for c in colours {
        *counts.entry(c).or_default() += 1;
    }
    let mut ranked: Vec<(Colour, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
}

fn same_set(a: &[Colour], b: &[Colour]) -> bool {
    a.iter().all(|c| b.contains(c)) && b.iter().all(|c| a.contains(c))
}
