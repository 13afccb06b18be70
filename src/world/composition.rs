//! A procedural composition score for shapes-world scenes: the target the shipped aesthetic head
//! learns, a stand-in for human aesthetic ratings (the LAION predictor's training signal).
//!
//! Deterministic from the [`Scene`], in 0..10 (the LAION predictor's range), the weighted sum of
//! four parts, each in 0..1:
//!
//! | part | weight | what it rewards |
//! |---|---:|---|
//! | centring | 3 | the shapes' area-weighted centroid near the image centre: `1 - d / 0.6`, `d` the centroid's distance from the centre in half-image units, floored at 0 |
//! | fill | 2 | shapes covering about a fifth of the frame: `exp(-ln(f / 0.2)² / 0.5)`, `f` the summed bounding-box area over the image area |
//! | contrast | 3 | shapes that stand out from the background behind them: mean over shapes of `min(|ΔY| / 128, 1)`, `Y` the Rec. 601 luma of the palette colours |
//! | harmony | 2 | a calm palette: `1.2 - 0.2 k` for `k` distinct colours in the scene (background included; 1 for two colours), halved on a split background |

use super::palette::Colour;
use super::scene::{Scene, Split};

/// The parts of the score, each in 0..1, and the weighted total in 0..10.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Composition {
    pub centring: f64,
    pub fill: f64,
    pub contrast: f64,
    pub harmony: f64,
    pub total: f64,
}

/// Scores a scene (see the module docs for the definition).
pub fn composition(scene: &Scene) -> Composition {
    let half = scene.size as f64 / 2.0;
    let shapes = &scene.shapes;
    let weights: Vec<f64> = shapes.iter().map(|s| (s.radius as f64).powi(2)).collect();
    let total_weight: f64 = weights.iter().sum::<f64>().max(1e-9);
    let gx = shapes.iter().zip(&weights).map(|(s, w)| s.centre.0 as f64 * w).sum::<f64>() / total_weight;
    let gy = shapes.iter().zip(&weights).map(|(s, w)| s.centre.1 as f64 * w).sum::<f64>() / total_weight;
    let d = ((gx - half).powi(2) + (gy - half).powi(2)).sqrt() / half;
    let centring = (1.0 - d / 0.6).max(0.0);

    let area: f64 = shapes.iter().map(|s| (2.0 * s.radius as f64).powi(2)).sum();
    let f = (area / (scene.size as f64).powi(2)).max(1e-6);
    let fill = (-(f / 0.2).ln().powi(2) / 0.5).exp();

    let contrast = if shapes.is_empty() {
        0.0
    } else {
        shapes
            .iter()
            .map(|s| {
                let behind = background_at(scene, s.centre.0 as f64, s.centre.1 as f64);
                ((luma(s.colour) - luma(behind)).abs() / 128.0).min(1.0)
            })
            .sum::<f64>()
            / shapes.len() as f64
    };

    let mut colours: Vec<Colour> = scene.background.clone();
    colours.extend(shapes.iter().map(|s| s.colour));
    colours.sort();
    colours.dedup();
    let split = if scene.background.len() > 1 { 0.5 } else { 1.0 };
    let harmony = (1.2 - 0.2 * colours.len() as f64).clamp(0.0, 1.0) * split;

    let total = 3.0 * centring + 2.0 * fill + 3.0 * contrast + 2.0 * harmony;
    Composition { centring, fill, contrast, harmony, total }
}

/// The background colour at pixel (x, y).
fn background_at(scene: &Scene, x: f64, y: f64) -> Colour {
    let half = scene.size as f64 / 2.0;
    match (scene.background.as_slice(), scene.split) {
        ([first, second, ..], Split::LeftRight) => if x < half { *first } else { *second },
        ([first, second, ..], Split::TopBottom) => if y < half { *first } else { *second },
        ([only], _) => *only,
        ([], _) => Colour::Black,
    }
}

/// Rec. 601 luma of a palette colour, 0..255.
fn luma(c: Colour) -> f64 {
    let [r, g, b] = c.rgb();
    0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64
}
