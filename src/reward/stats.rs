//! Cheap image statistics as rewards (a trivially learnable target, handy for tests and demos).

use image::RgbImage;

use super::{Reward, Score};

/// Mean of all channels of all pixels, in 0..1.
pub fn mean_brightness(img: &RgbImage) -> f64 {
    let sum: u64 = img.as_raw().iter().map(|&v| v as u64).sum();
    sum as f64 / (img.as_raw().len().max(1) as f64 * 255.0)
}

/// Reward = mean brightness in 0..1.
pub struct Brightness;

impl Reward for Brightness {
    fn name(&self) -> &str {
        "brightness"
    }

    fn score(&self, images: &[RgbImage], _: &[String]) -> anyhow::Result<Vec<Score>> {
        Ok(images.iter().map(|img| Score::new(mean_brightness(img))).collect())
    }
}
