//! Labelled sample grids: images upscaled and tiled, each with its caption
//! written underneath, and saving them as PNG.

use super::font::{draw_text, ADVANCE, GLYPH_WIDTH, LINE_HEIGHT};
use anyhow::{bail, Context, Result};
use image::{imageops, ImageFormat, Rgb, RgbImage};
use std::path::Path;

/// Gap in pixels between tiles and around the grid's edge.
pub const GAP: u32 = 4;
/// Labels wrap onto at most this many lines; longer ones end in "...".
pub const MAX_LABEL_LINES: usize = 3;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([0, 0, 0]);

/// Height in pixels of the label area under each tile.
pub fn label_height() -> u32 {
    MAX_LABEL_LINES as u32 * LINE_HEIGHT
}

/// Tiles `images` (upscaled `scale`x, nearest neighbour) in rows of `cols`
/// on a white sheet, with `labels[i]` word-wrapped under image `i`. Missing
/// labels leave the space blank; `cols` and `scale` of 0 are taken as 1.
pub fn labelled_grid(images: &[RgbImage], labels: &[String], cols: usize, scale: u32) -> RgbImage {
    let (cols, scale) = (cols.max(1), scale.max(1));
    let tile_w = images.iter().map(|img| img.width()).max().unwrap_or(0) * scale;
    let tile_h = images.iter().map(|img| img.height()).max().unwrap_or(0) * scale;
    let cell_h = tile_h + label_height();
    let rows = images.len().div_ceil(cols);
    let used_cols = cols.min(images.len());
    let width = used_cols as u32 * (tile_w + GAP) + GAP;
    let height = rows as u32 * (cell_h + GAP) + GAP;
    let mut sheet = RgbImage::from_pixel(width, height, WHITE);
    for (i, img) in images.iter().enumerate() {
        let x = GAP + (i % cols) as u32 * (tile_w + GAP);
        let y = GAP + (i / cols) as u32 * (cell_h + GAP);
        let tile = imageops::resize(
            img,
            img.width() * scale,
            img.height() * scale,
            imageops::FilterType::Nearest,
        );
        imageops::replace(&mut sheet, &tile, x as i64, y as i64);
        let label = labels.get(i).map_or("", String::as_str);
        for (line_no, line) in wrap(label, chars_per_line(tile_w)).iter().enumerate() {
            draw_text(
                &mut sheet,
                x,
                y + tile_h + 1 + line_no as u32 * LINE_HEIGHT,
                line,
                INK,
                1,
            );
        }
    }
    sheet
}

/// How many characters fit on a label line under a tile `width` pixels wide.
fn chars_per_line(width: u32) -> usize {
    ((width + ADVANCE - GLYPH_WIDTH) / ADVANCE).max(1) as usize
}

/// Greedy word wrap to `width` characters and [`MAX_LABEL_LINES`] lines; words
/// longer than a line are cut, and text that does not fit ends in "...".
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = current.chars().count();
            let sep = usize::from(used > 0);
            if used + sep + word.len() <= width {
                if sep == 1 {
                    current.push(' ');
                }
                current.extend(word.iter());
                break;
            }
            if used > 0 {
                lines.push(std::mem::take(&mut current));
            } else {
                // A word longer than the whole line: cut it.
                lines.push(word.drain(..width).collect());
            }
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    if lines.len() > MAX_LABEL_LINES {
        lines.truncate(MAX_LABEL_LINES);
        let last = &mut lines[MAX_LABEL_LINES - 1];
        let keep = width.saturating_sub(3).min(last.chars().count());
        *last = last.chars().take(keep).collect::<String>() + "...";
    }
    lines
}

/// Writes `img` as a PNG; refuses other extensions and missing folders with a
/// one-line error naming the path.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let is_png = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!(
            "cannot save image to {}: the file name must end in .png",
            path.display()
        );
    }
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        bail!(
            "cannot save image to {}: folder {} does not exist",
            path.display(),
            folder.display()
        );
    }
    img.save_with_format(path, ImageFormat::Png)
        .with_context(|| format!("cannot save image to {}", path.display()))
}
