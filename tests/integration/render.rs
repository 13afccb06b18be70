//! Images <-> tensors, labelled grids and PNG saving.

use candle_core::{Device, Tensor};
use ddpo::render::font::{ADVANCE, LINE_HEIGHT};
use ddpo::render::grid::{label_height, wrap, GAP, MAX_LABEL_LINES};
use ddpo::render::*;
use image::{Rgb, RgbImage};

fn gradient(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 + seed) as u8,
            (y * 13 + seed * 3) as u8,
            ((x ^ y) * 5 + seed) as u8,
        ])
    })
}

#[test]
fn tensor_round_trip_is_exact() {
    let images: Vec<RgbImage> = (0..3).map(|i| gradient(20, 12, i * 50)).collect();
    let t = images_to_tensor(&images, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 3, 12, 20]);
    let (min, max) = (
        t.min_all().unwrap().to_scalar::<f32>().unwrap(),
        t.max_all().unwrap().to_scalar::<f32>().unwrap(),
    );
    assert!((-1.0..=1.0).contains(&min) && (-1.0..=1.0).contains(&max));
    // Channel-first layout: element (n, c, y, x) is channel c of pixel (x, y).
    let v = t
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .get(5)
        .unwrap()
        .get(7)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(
        ((v + 1.0) * 127.5).round() as u8,
        images[1].get_pixel(7, 5)[2]
    );
    let back = tensor_to_images(&t).unwrap();
    assert_eq!(back, images);

    let every_value = RgbImage::from_fn(16, 16, |x, y| {
        let v = (y * 16 + x) as u8;
        Rgb([v, 255 - v, v / 2])
    });
    let t = images_to_tensor(std::slice::from_ref(&every_value), &Device::Cpu).unwrap();
    assert_eq!(tensor_to_images(&t).unwrap()[0], every_value);
}

#[test]
fn tensor_to_images_clamps_and_checks_shape() {
    let t = Tensor::new(&[-3.0f32, -1.0, 0.0, 1.0, 5.0, f32::NAN], &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 2))
        .unwrap();
    let img = &tensor_to_images(&t).unwrap()[0];
    assert_eq!(img.get_pixel(0, 0).0, [0, 128, 255]);
    assert_eq!(img.get_pixel(1, 0).0[..2], [0, 255]);

    let gray = Tensor::zeros((2, 1, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(tensor_to_images(&gray).is_err());
    assert!(images_to_tensor(&[], &Device::Cpu).is_err());
    let err = images_to_tensor(&[gradient(4, 4, 0), gradient(5, 4, 0)], &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("image 1 is 5x4"), "{err}");
}

#[test]
fn grid_has_the_documented_dimensions() {
    let images: Vec<RgbImage> = (0..5).map(|i| gradient(32, 32, i)).collect();
    let labels: Vec<String> = (0..5).map(|i| format!("sample {i}")).collect();
    let grid = labelled_grid(&images, &labels, 3, 4);
    let cell_w = 32 * 4;
    let cell_h = 32 * 4 + label_height();
    assert_eq!(
        grid.dimensions(),
        (3 * cell_w + 4 * GAP, 2 * cell_h + 3 * GAP)
    );
    assert_eq!(label_height(), MAX_LABEL_LINES as u32 * LINE_HEIGHT);

    // Tiles are nearest-neighbour upscaled in place; the gaps stay white.
    assert_eq!(
        grid.get_pixel(GAP + 4 * 3 + 1, GAP + 4 * 2 + 3),
        images[0].get_pixel(3, 2)
    );
    assert_eq!(
        grid.get_pixel(2 * GAP + cell_w, GAP),
        images[1].get_pixel(0, 0)
    );
    assert_eq!(grid.get_pixel(GAP / 2, GAP / 2).0, [255; 3]);
    // The label is drawn in black just under its tile.
    let label_rows = GAP + cell_w..GAP + cell_h;
    assert!(label_rows
        .flat_map(|y| (GAP..GAP + cell_w).map(move |x| (x, y)))
        .any(|(x, y)| grid.get_pixel(x, y).0 == [0; 3]));

    // Fewer images than columns: the sheet shrinks to them; degenerate arguments do not panic.
    assert_eq!(labelled_grid(&images[..1], &[], 8, 1).width(), 32 + 2 * GAP);
    assert_eq!(
        labelled_grid(&images[..2], &labels, 0, 0).dimensions(),
        (32 + 2 * GAP, 2 * (32 + label_height()) + 3 * GAP)
    );
    assert_eq!(labelled_grid(&[], &[], 3, 2).dimensions(), (GAP, GAP));
}

#[test]
fn labels_wrap_to_the_tile_and_end_in_an_ellipsis() {
    let lines = wrap(
        "a yellow triangle above a white ring on a purple background",
        21,
    );
    assert_eq!(
        lines,
        vec![
            "a yellow triangle",
            "above a white ring on",
            "a purple background"
        ]
    );
    let long = wrap(&"word ".repeat(40), 10);
    assert_eq!(long.len(), MAX_LABEL_LINES);
    assert!(long.iter().all(|l| l.chars().count() <= 10));
    assert!(long[2].ends_with("..."));
    assert_eq!(wrap("abcdefghijkl", 5), vec!["abcde", "fghij", "kl"]);
    assert!(wrap("", 5).is_empty());
    // 128 px tiles hold 21 characters of 6 px (the last without its spacing column).
    assert_eq!((128 + 1) / ADVANCE, 21);
}

#[test]
fn save_png_writes_png_and_rejects_bad_paths() {
    let dir = tempfile::tempdir().unwrap();
    let img = gradient(8, 8, 1);
    let path = dir.path().join("grid.png");
    save_png(&img, &path).unwrap();
    assert_eq!(image::open(&path).unwrap().to_rgb8(), img);

    let err = save_png(&img, &dir.path().join("out.jpg"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("out.jpg") && err.contains(".png"), "{err}");
    assert!(!err.contains('\n'));

    let missing = dir.path().join("no_such_folder").join("grid.png");
    let err = save_png(&img, &missing).unwrap_err().to_string();
    assert!(
        err.contains("no_such_folder") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!missing.exists());
}

#[test]
fn text_is_clipped_at_the_image_edge() {
    use ddpo::render::font::{draw_text, text_width};
    let mut img = RgbImage::from_pixel(20, 10, Rgb([255; 3]));
    draw_text(&mut img, 0, 0, "HI", Rgb([0; 3]), 1);
    let inked = |img: &RgbImage| img.pixels().filter(|p| p.0 == [0; 3]).count();
    // 'H' is two 7-pixel columns and a 3-pixel bar; 'I' a 7-pixel stem and 4 serif pixels.
    assert_eq!(inked(&img), 17 + 11);
    assert_eq!(text_width("HI", 2), 2 * (2 * ADVANCE - 1));
    assert!((0..10).all(|y| img.get_pixel(19, y).0 == [255; 3]));
    draw_text(&mut img, 15, 8, &"W".repeat(1000), Rgb([0; 3]), 3);
    draw_text(
        &mut img,
        u32::MAX,
        u32::MAX,
        "far away",
        Rgb([0; 3]),
        u32::MAX,
    );
    draw_text(&mut img, 0, 0, "huge", Rgb([0; 3]), u32::MAX);
    assert!(inked(&img) > 28);
}
