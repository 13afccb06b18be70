//! Images in a terminal: two pixel rows per text row with the upper half block `▀`, its
//! foreground the upper pixel and its background the lower one, in 24-bit ANSI colour.

use image::RgbImage;

/// The image as ANSI half-block text, scaled up (nearest neighbour) to at most `max_cols`
/// columns so small samples are visible; every row ends with a colour reset and a newline.
pub fn half_blocks(img: &RgbImage, max_cols: u32) -> String {
    let (w, h) = img.dimensions();
    let scale = (max_cols / w.max(1)).max(1);
    let (cols, rows) = (w * scale, h * scale);
    let px = |x: u32, y: u32| img.get_pixel(x / scale, y / scale).0;
    let mut out = String::new();
    for y in (0..rows).step_by(2) {
        for x in 0..cols {
            let [r, g, b] = px(x, y);
            // An odd last row has no lower pixel: the terminal's own background shows.
            if y + 1 < rows {
                let [br, bg, bb] = px(x, y + 1);
                out.push_str(&format!("\x1b[38;2;{r};{g};{b}m\x1b[48;2;{br};{bg};{bb}m▀"));
            } else {
                out.push_str(&format!("\x1b[0m\x1b[38;2;{r};{g};{b}m▀"));
            }
        }
        out.push_str("\x1b[0m\n");
    }
    out
}
