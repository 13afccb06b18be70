//! JPEG compressibility rewards, as in the DDPO paper: the image's JPEG size in kB at quality 95
//! (negated for compressibility), computed exactly as the reference does (pixels rounded to u8).

use anyhow::Context;
use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;

use super::{Reward, Score};

/// JPEG size of `img` at quality 95, in kB (bytes / 1000): the DDPO compressibility measure.
pub fn jpeg_kb(img: &RgbImage) -> anyhow::Result<f64> {
    jpeg_kb_at(img, 95)
}

/// JPEG size of `img` at `quality` (1..=100), in kB (bytes / 1000).
pub fn jpeg_kb_at(img: &RgbImage, quality: i64) -> anyhow::Result<f64> {
    anyhow::ensure!((1..=100).contains(&quality), "jpeg_size({quality}): quality must be between 1 and 100");
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, quality as u8).encode_image(img).context("jpeg_size")?;
    Ok(bytes.len() as f64 / 1000.0)
}

/// Reward = -JPEG size: smaller files are better.
pub struct JpegCompressibility;

/// Reward = +JPEG size: more detail is better.
pub struct JpegIncompressibility;

impl Reward for JpegCompressibility {
    fn name(&self) -> &str {
        "compressibility"
    }

    fn score(&self, images: &[RgbImage], _: &[String]) -> anyhow::Result<Vec<Score>> {
        images
            .iter()
            .map(|img| jpeg_kb(img).map(|kb| Score::new(-kb).with("jpeg_kb", kb)))
            .collect()
    }
}

impl Reward for JpegIncompressibility {
    fn name(&self) -> &str {
        "incompressibility"
    }

    fn score(&self, images: &[RgbImage], _: &[String]) -> anyhow::Result<Vec<Score>> {
        images
            .iter()
            .map(|img| jpeg_kb(img).map(|kb| Score::new(kb).with("jpeg_kb", kb)))
            .collect()
    }
}
