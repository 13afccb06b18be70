//! A reward curve as a PNG: the per-epoch mean as a line inside a mean ± std band, with the
//! y-range written in the corner. No plotting dependency needed for one chart.

use image::{Rgb, RgbImage};

use super::font::draw_text;

/// Draws `mean[i] ± std[i]` against epoch `i` on a `width` x `height` white canvas.
pub fn reward_curve(mean: &[f64], std: &[f64], width: u32, height: u32, title: &str) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = (8u32, 8u32, 22u32, 8u32);
    let (pw, ph) = (width - left - right, height - top - bottom);
    let lo = mean.iter().zip(std).map(|(m, s)| m - s).fold(f64::INFINITY, f64::min);
    let hi = mean.iter().zip(std).map(|(m, s)| m + s).fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if hi - lo < 1e-9 { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
    let y_of = |v: f64| top as f64 + (hi - v) / (hi - lo) * ph as f64;
    let at = |i: f64, v: &[f64]| {
        // Linear interpolation between epochs, for drawing column by column.
        let (a, b) = (i.floor() as usize, (i.ceil() as usize).min(v.len() - 1));
        v[a] + (v[b] - v[a]) * (i - a as f64)
    };
    if !mean.is_empty() {
        for px in left..left + pw {
            let i = ((px - left) as f64 * (mean.len().max(2) - 1) as f64 / pw as f64).min((mean.len() - 1) as f64);
            let (m, s) = (at(i, mean), at(i, std));
            let (y0, y1) = (y_of(m + s).max(0.0) as u32, y_of(m - s).min((height - 1) as f64) as u32);
            for py in y0..=y1 {
                img.put_pixel(px, py, Rgb([198, 219, 239]));
            }
        }
        for px in left..left + pw {
            let i = ((px - left) as f64 * (mean.len().max(2) - 1) as f64 / pw as f64).min((mean.len() - 1) as f64);
            let y = y_of(at(i, mean)).clamp(0.0, (height - 2) as f64) as u32;
            img.put_pixel(px, y, Rgb([33, 113, 181]));
            img.put_pixel(px, y + 1, Rgb([33, 113, 181]));
        }
    }
    let label = format!("{title}  [{lo:.3}, {hi:.3}]  epochs {}", mean.len());
    draw_text(&mut img, left, 6, &label, Rgb([0, 0, 0]), 1);
    img
}
