//! Conversion between u8 RGB images and (N, 3, H, W) f32 tensors in [-1, 1],
//! the value range the diffusion model works in.

use candle_core::{bail, DType, Device, Tensor};
use image::RgbImage;

/// Stacks same-sized images into an (N, 3, H, W) f32 tensor, mapping 0..=255 to -1..=1.
pub fn images_to_tensor(images: &[RgbImage], device: &Device) -> candle_core::Result<Tensor> {
    let Some(first) = images.first() else {
        bail!("images_to_tensor: no images given");
    };
    let (w, h) = first.dimensions();
    if let Some((i, odd)) = images
        .iter()
        .enumerate()
        .find(|(_, img)| img.dimensions() != (w, h))
    {
        bail!(
            "images_to_tensor: image {i} is {}x{}, image 0 is {w}x{h}",
            odd.width(),
            odd.height()
        );
    }
    let plane = (w * h) as usize;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (img, chw) in images.iter().zip(data.chunks_exact_mut(3 * plane)) {
        for (i, pixel) in img.pixels().enumerate() {
            for (c, &value) in pixel.0.iter().enumerate() {
                chw[c * plane + i] = value as f32 / 127.5 - 1.0;
            }
        }
    }
    Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)
}

/// The inverse of [`images_to_tensor`]: values are clamped to [-1, 1] and
/// rounded to the nearest u8. Accepts any float dtype on any device.
pub fn tensor_to_images(t: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (n, c, h, w) = t.dims4()?;
    if c != 3 {
        bail!(
            "tensor_to_images: expected 3 channels, got shape {:?}",
            t.shape()
        );
    }
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    let to_u8 = |x: f32| ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
    let images = data
        .chunks_exact(3 * plane)
        .take(n)
        .map(|chw| {
            let mut img = RgbImage::new(w as u32, h as u32);
            for (i, pixel) in img.pixels_mut().enumerate() {
                pixel.0 = [0, 1, 2].map(|ch| to_u8(chw[ch * plane + i]));
            }
            img
        })
        .collect();
    Ok(images)
}
