//! Pixel maths behind the image primitives of reward scripts (see [`super::registry`]): colour
//! statistics, hue histograms, greyscale, crops, resizes and PNG sizes. Colours are in 0..1.

use std::io::Cursor;

use anyhow::Context;
use image::RgbImage;

/// Colour of the pixel at (x, y), channels in 0..1; (0, 0) is the top left.
pub fn pixel(img: &RgbImage, x: i64, y: i64) -> anyhow::Result<[f64; 3]> {
    let (w, h) = img.dimensions();
    anyhow::ensure!(x >= 0 && y >= 0 && x < w as i64 && y < h as i64, "pixel({x}, {y}) is outside the {w}x{h} image");
    Ok(img.get_pixel(x as u32, y as u32).0.map(|c| c as f64 / 255.0))
}

/// Mean colour over all pixels, channels in 0..1.
pub fn mean_rgb(img: &RgbImage) -> [f64; 3] {
    let mut sum = [0u64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            sum[c] += p.0[c] as u64;
        }
    }
    let n = (img.pixels().len().max(1) as f64) * 255.0;
    sum.map(|s| s as f64 / n)
}

/// HSV of an RGB pixel: hue in degrees 0..360, saturation and value in 0..1.
pub fn hsv([r, g, b]: [u8; 3]) -> (f64, f64, f64) {
    let (r, g, b) = (r as f64 / 255.0, g as f64 / 255.0, b as f64 / 255.0);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let s = if max > 0.0 { d / max } else { 0.0 };
    let h = if d == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    (h, s, max)
}

/// Mean HSV saturation, in 0..1 (0 for a grey image).
pub fn saturation(img: &RgbImage) -> f64 {
    let n = img.pixels().len().max(1) as f64;
    img.pixels().map(|p| hsv(p.0).1).sum::<f64>() / n
}

/// Fraction of coloured pixels (saturation >= 0.1) in each of `bins` equal hue ranges starting
/// at red; all zeros for a grey image.
pub fn hue_histogram(img: &RgbImage, bins: i64) -> anyhow::Result<Vec<f64>> {
    anyhow::ensure!((1..=360).contains(&bins), "hue_histogram({bins}): bins must be between 1 and 360");
    let mut counts = vec![0usize; bins as usize];
    let mut coloured = 0usize;
    for p in img.pixels() {
        let (h, s, _) = hsv(p.0);
        if s >= 0.1 {
            counts[((h / 360.0 * bins as f64) as usize).min(bins as usize - 1)] += 1;
            coloured += 1;
        }
    }
    Ok(counts.iter().map(|&c| c as f64 / coloured.max(1) as f64).collect())
}

/// Greyscale copy (luma, Rec. 601 weights) with three equal channels.
pub fn to_gray(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let [r, g, b] = p.0;
        let y = (0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64).round().clamp(0.0, 255.0) as u8;
        p.0 = [y, y, y];
    }
    out
}

/// The w x h rectangle whose top left is (x, y); it must lie inside the image.
pub fn crop(img: &RgbImage, x: i64, y: i64, w: i64, h: i64) -> anyhow::Result<RgbImage> {
    let (iw, ih) = img.dimensions();
    anyhow::ensure!(
        x >= 0 && y >= 0 && w >= 1 && h >= 1 && x + w <= iw as i64 && y + h <= ih as i64,
        "crop({x}, {y}, {w}, {h}) is not a non-empty rectangle inside the {iw}x{ih} image"
    );
    Ok(image::imageops::crop_imm(img, x as u32, y as u32, w as u32, h as u32).to_image())
}

/// Resized copy (bilinear), 1 to 1024 pixels a side.
pub fn resize(img: &RgbImage, w: i64, h: i64) -> anyhow::Result<RgbImage> {
    anyhow::ensure!((1..=1024).contains(&w) && (1..=1024).contains(&h), "resize({w}, {h}): sides must be between 1 and 1024");
    Ok(image::imageops::resize(img, w as u32, h as u32, image::imageops::FilterType::Triangle))
}

/// Size in kB (1000 bytes) of the image encoded as PNG.
pub fn png_kb(img: &RgbImage) -> anyhow::Result<f64> {
    Ok(png_bytes(img).context("png_size")?.len() as f64 / 1000.0)
}

/// The image encoded as PNG.
pub fn png_bytes(img: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).context("encoding the image as PNG")?;
    Ok(bytes.into_inner())
}
