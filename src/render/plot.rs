//! Line plots a researcher can read values off: epochs on x with ticks, values on y with tick
//! labels, a title, axis labels and a legend; each series a line, optionally with a shaded band.
//! `reward.png` of a run is one ([`reward_curve`]).

use image::{Rgb, RgbImage};

use super::font::{draw_text, fill, text_width, LINE_HEIGHT};

/// One line of a plot: a value per epoch, and optionally a +-band around it.
pub struct Series<'a> {
    pub name: &'a str,
    pub values: &'a [f64],
    pub band: Option<&'a [f64]>,
    pub colour: Rgb<u8>,
}

const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);

/// The reward curve of a run: mean per epoch, and a band of +-1 standard deviation over the
/// epoch's samples.
pub fn reward_curve(mean: &[f64], std: &[f64], width: u32, height: u32, title: &str) -> RgbImage {
    let series = Series { name: "reward mean (band: +-1 std over the epoch's samples)", values: mean, band: Some(std), colour: Rgb([33, 113, 181]) };
    line_plot(&[series], title, "epoch", "reward", width, height)
}

/// Draws `series` against epochs 0.. on one pair of axes.
pub fn line_plot(series: &[Series], title: &str, x_label: &str, y_label: &str, width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let (lo, hi) = value_range(series);
    let y_ticks = ticks(lo, hi, 5);
    let label_w = y_ticks.iter().map(|&t| text_width(&tick_label(t, &y_ticks), 1)).max().unwrap_or(0);
    let legend_h = LINE_HEIGHT * series.len() as u32;
    let frame = Frame { left: label_w + 16, right: 10, top: 12 + 2 * LINE_HEIGHT + legend_h, bottom: 2 * LINE_HEIGHT + 8, width, height, lo, hi };
    let epochs = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    draw_text(&mut img, frame.left, 4, title, BLACK, 1);
    frame.grid(&mut img, &y_ticks, epochs);
    // Every band before any line, so that one series' band never hides another's line.
    for s in series {
        frame.band(&mut img, s);
    }
    for s in series {
        frame.line(&mut img, s);
    }
    frame.axes(&mut img, &y_ticks, epochs, x_label, y_label);
    for (i, s) in series.iter().enumerate() {
        let y = 6 + LINE_HEIGHT * (i as u32 + 1);
        fill(&mut img, frame.left, y + 2, 14, 3, s.colour);
        draw_text(&mut img, frame.left + 18, y, s.name, BLACK, 1);
    }
    img
}

/// The plotting area inside `width` x `height` and the value range it shows.
struct Frame {
    left: u32,
    right: u32,
    top: u32,
    bottom: u32,
    width: u32,
    height: u32,
    lo: f64,
    hi: f64,
}

impl Frame {
    fn plot_width(&self) -> u32 {
        self.width.saturating_sub(self.left + self.right).max(1)
    }

    fn plot_height(&self) -> u32 {
        self.height.saturating_sub(self.top + self.bottom).max(1)
    }

    fn y_of(&self, v: f64) -> f64 {
        self.top as f64 + (self.hi - v) / (self.hi - self.lo) * self.plot_height() as f64
    }

    /// Pixel column of epoch `e` (of `epochs`): the first at the left edge, the last at the right.
    fn x_of(&self, e: f64, epochs: usize) -> f64 {
        self.left as f64 + e / (epochs.max(2) - 1) as f64 * self.plot_width() as f64
    }

    /// The epoch (fractional) under pixel column `px`.
    fn epoch_at(&self, px: u32, epochs: usize) -> f64 {
        ((px - self.left) as f64 * (epochs.max(2) - 1) as f64 / self.plot_width() as f64).min(epochs.saturating_sub(1) as f64)
    }

    fn grid(&self, img: &mut RgbImage, y_ticks: &[f64], epochs: usize) {
        for &t in y_ticks {
            fill(img, self.left, self.y_of(t) as u32, self.plot_width(), 1, GRID);
        }
        for e in epoch_ticks(epochs) {
            fill(img, self.x_of(e as f64, epochs) as u32, self.top, 1, self.plot_height(), GRID);
        }
    }

    fn band(&self, img: &mut RgbImage, s: &Series) {
        let (Some(band), false) = (s.band, s.values.is_empty()) else { return };
        let light = Rgb(s.colour.0.map(|c| ((c as u16 + 3 * 255) / 4) as u8));
        for px in self.left..self.left + self.plot_width() {
            let e = self.epoch_at(px, s.values.len());
            let (Some(m), Some(d)) = (interpolate(s.values, e), interpolate(band, e)) else { continue };
            let (y0, y1) = (self.y_of(m + d).max(self.top as f64) as u32, self.y_of(m - d).min((self.top + self.plot_height()) as f64) as u32);
            fill(img, px, y0, 1, y1.saturating_sub(y0) + 1, light);
        }
    }

    fn line(&self, img: &mut RgbImage, s: &Series) {
        if s.values.is_empty() {
            return;
        }
        let bottom = (self.top + self.plot_height()) as f64;
        let y_at = |v: f64| self.y_of(v).clamp(self.top as f64, bottom - 1.0) as u32;
        for px in self.left..self.left + self.plot_width() {
            if let Some(v) = interpolate(s.values, self.epoch_at(px, s.values.len())) {
                fill(img, px, y_at(v), 1, 2, s.colour);
            }
        }
        // A series with gaps (values on some epochs only, e.g. evaluations) marks its points.
        if s.values.iter().any(|v| !v.is_finite()) {
            for (e, &v) in s.values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
                let x = self.x_of(e as f64, s.values.len()) as u32;
                fill(img, x.saturating_sub(2), y_at(v).saturating_sub(2), 5, 5, s.colour);
            }
        }
    }

    fn axes(&self, img: &mut RgbImage, y_ticks: &[f64], epochs: usize, x_label: &str, y_label: &str) {
        let (pw, ph) = (self.plot_width(), self.plot_height());
        fill(img, self.left, self.top, 1, ph + 1, BLACK);
        fill(img, self.left, self.top + ph, pw, 1, BLACK);
        for &t in y_ticks {
            let (y, text) = (self.y_of(t) as u32, tick_label(t, y_ticks));
            fill(img, self.left - 3, y, 3, 1, BLACK);
            draw_text(img, self.left - 5 - text_width(&text, 1), y.saturating_sub(3), &text, BLACK, 1);
        }
        for e in epoch_ticks(epochs) {
            let (x, text) = (self.x_of(e as f64, epochs) as u32, e.to_string());
            fill(img, x, self.top + ph, 1, 3, BLACK);
            draw_text(img, x.saturating_sub(text_width(&text, 1) / 2), self.top + ph + 5, &text, BLACK, 1);
        }
        let x_text_at = self.left + pw / 2 - text_width(x_label, 1) / 2;
        draw_text(img, x_text_at, self.top + ph + 5 + LINE_HEIGHT, x_label, BLACK, 1);
        draw_text(img, 2, self.top.saturating_sub(LINE_HEIGHT + 1), y_label, BLACK, 1);
    }
}

/// The range every series (with its band) spans, widened when flat.
fn value_range(series: &[Series]) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for s in series {
        for (i, &v) in s.values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            let d = s.band.and_then(|b| b.get(i)).copied().filter(|d| d.is_finite()).unwrap_or(0.0);
            (lo, hi) = (lo.min(v - d), hi.max(v + d));
        }
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// About `n` round tick values inside [lo, hi] (steps of 1, 2 or 5 times a power of ten, the
/// one giving the count nearest `n`).
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let raw = (hi - lo) / n.max(1) as f64;
    let power = 10f64.powf(raw.log10().floor());
    let count = |s: f64| ((hi - lo) / s - n as f64).abs();
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).min_by(|a, b| count(*a).total_cmp(&count(*b))).unwrap_or(power);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A tick value with as many decimals as its step needs.
fn tick_label(v: f64, ticks: &[f64]) -> String {
    let step = if ticks.len() > 1 { (ticks[1] - ticks[0]).abs() } else { 1.0 };
    let decimals = (-step.log10() - 1e-6).ceil().max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// Epochs to label on x: every one for a short run, else about eight round ones.
fn epoch_ticks(epochs: usize) -> Vec<usize> {
    if epochs <= 1 {
        return vec![0];
    }
    let step = ticks(0.0, (epochs - 1) as f64, 8).get(1).map_or(1, |s| (*s as usize).max(1));
    (0..epochs).step_by(step).collect()
}

/// The value at fractional epoch `i`, linear between the nearest finite values on either side
/// (NaN marks an epoch without a value); `None` outside the first and last finite value.
fn interpolate(v: &[f64], i: f64) -> Option<f64> {
    let a = (0..=(i.floor() as usize).min(v.len() - 1)).rev().find(|&k| v[k].is_finite())?;
    let b = ((i.ceil() as usize).min(v.len() - 1)..v.len()).find(|&k| v[k].is_finite())?;
    if a == b {
        return Some(v[a]);
    }
    Some(v[a] + (v[b] - v[a]) * (i - a as f64) / (b - a) as f64)
}

/// Images stacked top to bottom on white, as wide as the widest.
pub fn stack(panels: &[RgbImage]) -> RgbImage {
    let width = panels.iter().map(RgbImage::width).max().unwrap_or(1);
    let mut out = RgbImage::from_pixel(width, panels.iter().map(RgbImage::height).sum::<u32>().max(1), Rgb([255, 255, 255]));
    let mut y = 0;
    for p in panels {
        image::imageops::replace(&mut out, p, 0, y as i64);
        y += p.height();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let labels = |t: Vec<f64>| t.iter().map(|&v| tick_label(v, &t)).collect::<Vec<_>>();
        assert_eq!(labels(ticks(0.0, 1.0, 5)), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(labels(ticks(-1.57, -1.03, 5)), ["-1.5", "-1.4", "-1.3", "-1.2", "-1.1"]);
        assert_eq!(labels(ticks(3.0, 480.0, 4)), ["100", "200", "300", "400"]);
        assert_eq!(epoch_ticks(20), vec![0, 2, 4, 6, 8, 10, 12, 14, 16, 18]);
        assert_eq!(epoch_ticks(4), vec![0, 1, 2, 3]);
    }

    #[test]
    fn gaps_are_bridged_between_finite_values() {
        let v = [f64::NAN, 1.0, f64::NAN, f64::NAN, 4.0, f64::NAN];
        assert_eq!(interpolate(&v, 0.5), None, "before the first value");
        assert_eq!(interpolate(&v, 1.0), Some(1.0));
        assert_eq!(interpolate(&v, 2.5), Some(2.5));
        assert_eq!(interpolate(&v, 4.0), Some(4.0));
        assert_eq!(interpolate(&v, 4.5), None, "after the last value");
        assert_eq!(interpolate(&[0.0, 2.0], 0.25), Some(0.5));
    }
}
