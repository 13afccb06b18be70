//! The host API that scripts see, registered in one place ([`register`]). Every function is
//! registered together with its signature and doc through the `api!` macro, so `scripts/API.md`
//! ([`markdown`]) is generated from the registration itself and cannot drift from it.
//!
//! Images are `Image` values (an `image::RgbImage`, shared, never mutated in place); colours are
//! in 0..1. Randomness draws from the run's seeded generator and exists only in prompt scripts.

use std::cell::RefCell;
use std::io::Cursor;
use std::sync::{Arc, RwLock};

use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, FLOAT, INT};

use super::engine::charge_pixels;
use crate::reward::models::LazyModels;

type Res<T> = Result<T, Box<EvalAltResult>>;

/// An image handed to scripts: cheap to clone (shared pixels), immutable.
#[derive(Clone, Debug)]
pub struct Image(Arc<RgbImage>);

impl Image {
    pub fn new(img: RgbImage) -> Self {
        Self(Arc::new(img))
    }

    pub fn rgb(&self) -> &RgbImage {
        &self.0
    }
}

/// What the run tells scripts through `context()`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// The epoch about to run (0-based).
    pub epoch: usize,
    /// Optimiser steps taken so far in the run (all epochs).
    pub step: usize,
    /// Mean and standard deviation of the reward in each finished epoch, oldest first.
    pub reward_mean: Vec<f64>,
    pub reward_std: Vec<f64>,
}

impl Context {
    pub(crate) fn to_map(&self) -> Map {
        let floats = |v: &[f64]| -> Dynamic { v.iter().map(|&x| Dynamic::from_float(x)).collect::<Array>().into() };
        let mut m = Map::new();
        m.insert("epoch".into(), (self.epoch as INT).into());
        m.insert("step".into(), (self.step as INT).into());
        m.insert("reward_mean".into(), floats(&self.reward_mean));
        m.insert("reward_std".into(), floats(&self.reward_std));
        m
    }
}

/// One documented host function.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiEntry {
    pub name: &'static str,
    pub signature: &'static str,
    pub doc: &'static str,
}

thread_local! {
    /// The run's generator while a prompt script runs on this thread.
    static RNG: RefCell<Option<ChaCha8Rng>> = const { RefCell::new(None) };
}

/// Runs `f` (a prompt-script call) with `rand()` & co. drawing from `rng`, advancing it.
pub(crate) fn with_rng<T>(rng: &mut ChaCha8Rng, f: impl FnOnce() -> T) -> T {
    let previous = RNG.with(|r| r.replace(Some(rng.clone())));
    let out = f();
    if let Some(advanced) = RNG.with(|r| r.replace(previous)) {
        *rng = advanced;
    }
    out
}

fn draw<T>(what: &str, f: impl FnOnce(&mut ChaCha8Rng) -> Res<T>) -> Res<T> {
    RNG.with(|r| match r.borrow_mut().as_mut() {
        Some(rng) => f(rng),
        None => Err(format!("{what} is only available in prompt scripts (rewards must not be random)").into()),
    })
}

/// A learned primitive's result as a script value; errors read `name: message`.
fn learned<T>(result: anyhow::Result<T>, name: &str) -> Res<T> {
    result.map_err(|e| format!("{name}: {e:#}").into())
}

fn number(v: &Dynamic) -> Option<f64> {
    v.as_float().ok().or_else(|| v.as_int().ok().map(|i| i as f64))
}

/// Registers the host API on `engine`; returns the documentation of what it registered.
pub(crate) fn register(engine: &mut Engine, context: Arc<RwLock<Context>>, models: LazyModels) -> Vec<ApiEntry> {
    let mut docs = Vec::new();
    macro_rules! api {
        (fn $name:literal, $sig:literal, $doc:literal, $f:expr) => {{
            engine.register_fn($name, $f);
            docs.push(ApiEntry { name: $name, signature: $sig, doc: $doc });
        }};
        (get $name:literal, $sig:literal, $doc:literal, $f:expr) => {{
            engine.register_get($name, $f);
            docs.push(ApiEntry { name: $name, signature: $sig, doc: $doc });
        }};
    }
    engine.register_type_with_name::<Image>("Image");

    // --- images ---
    api!(get "width", "img.width -> int", "Image width in pixels.", |img: &mut Image| img.0.width() as INT);
    api!(get "height", "img.height -> int", "Image height in pixels.", |img: &mut Image| img.0.height() as INT);
    api!(fn "pixel", "img.pixel(x, y) -> [r, g, b]", "Colour of one pixel, channels in 0..1; (0, 0) is the top left.",
        |img: &mut Image, x: INT, y: INT| -> Res<Array> {
            let (w, h) = img.0.dimensions();
            if x < 0 || y < 0 || x >= w as INT || y >= h as INT {
                return Err(format!("pixel({x}, {y}) is outside the {w}x{h} image").into());
            }
            Ok(img.0.get_pixel(x as u32, y as u32).0.iter().map(|&c| Dynamic::from_float(c as FLOAT / 255.0)).collect())
        });
    api!(fn "mean_rgb", "img.mean_rgb() -> [r, g, b]", "Mean colour over all pixels, channels in 0..1.",
        |img: &mut Image| -> Array { mean_rgb(&img.0).iter().map(|&c| Dynamic::from_float(c)).collect() });
    api!(fn "brightness", "img.brightness() -> float", "Mean of all channels of all pixels, in 0..1.",
        |img: &mut Image| -> FLOAT { crate::reward::stats::mean_brightness(&img.0) });
    api!(fn "saturation", "img.saturation() -> float", "Mean HSV saturation, in 0..1 (0 for a grey image).",
        |img: &mut Image| -> FLOAT {
            let n = img.0.pixels().len().max(1) as f64;
            img.0.pixels().map(|p| hsv(p.0).1).sum::<f64>() / n
        });
    api!(fn "hue_histogram", "img.hue_histogram(bins) -> [float]",
        "Fraction of coloured pixels (saturation >= 0.1) in each of `bins` equal hue ranges starting at red; all zeros for a grey image.",
        |img: &mut Image, bins: INT| -> Res<Array> {
            if !(1..=360).contains(&bins) {
                return Err(format!("hue_histogram({bins}): bins must be between 1 and 360").into());
            }
            let mut counts = vec![0usize; bins as usize];
            let mut coloured = 0usize;
            for p in img.0.pixels() {
                let (h, s, _) = hsv(p.0);
                if s >= 0.1 {
                    counts[((h / 360.0 * bins as f64) as usize).min(bins as usize - 1)] += 1;
                    coloured += 1;
                }
            }
            Ok(counts.iter().map(|&c| Dynamic::from_float(c as f64 / coloured.max(1) as f64)).collect())
        });
    api!(fn "to_gray", "img.to_gray() -> Image", "Greyscale copy (luma, Rec. 601 weights) with three equal channels.",
        |img: &mut Image| -> Res<Image> {
            charge_pixels(img.0.width() as u64 * img.0.height() as u64)?;
            let mut out = (*img.0).clone();
            for p in out.pixels_mut() {
                let [r, g, b] = p.0;
                let y = (0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64).round().clamp(0.0, 255.0) as u8;
                p.0 = [y, y, y];
            }
            Ok(Image::new(out))
        });
    api!(fn "crop", "img.crop(x, y, w, h) -> Image", "The w x h rectangle whose top left is (x, y); it must lie inside the image.",
        |img: &mut Image, x: INT, y: INT, w: INT, h: INT| -> Res<Image> {
            let (iw, ih) = img.0.dimensions();
            if x < 0 || y < 0 || w < 1 || h < 1 || x + w > iw as INT || y + h > ih as INT {
                return Err(format!("crop({x}, {y}, {w}, {h}) is not a non-empty rectangle inside the {iw}x{ih} image").into());
            }
            charge_pixels(w as u64 * h as u64)?;
            Ok(Image::new(image::imageops::crop_imm(&*img.0, x as u32, y as u32, w as u32, h as u32).to_image()))
        });
    api!(fn "resize", "img.resize(w, h) -> Image", "Resized copy (bilinear), 1 to 1024 pixels a side.",
        |img: &mut Image, w: INT, h: INT| -> Res<Image> {
            if !(1..=1024).contains(&w) || !(1..=1024).contains(&h) {
                return Err(format!("resize({w}, {h}): sides must be between 1 and 1024").into());
            }
            charge_pixels(w as u64 * h as u64)?;
            Ok(Image::new(image::imageops::resize(&*img.0, w as u32, h as u32, image::imageops::FilterType::Triangle)))
        });
    api!(fn "jpeg_size", "img.jpeg_size(quality) -> float",
        "Size in kB (1000 bytes) of the image encoded as JPEG at `quality` (1..100); jpeg_size(95) is the DDPO compressibility measure.",
        |img: &mut Image, quality: INT| -> Res<FLOAT> {
            if !(1..=100).contains(&quality) {
                return Err(format!("jpeg_size({quality}): quality must be between 1 and 100").into());
            }
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, quality as u8)
                .encode_image(&*img.0)
                .map_err(|e| format!("jpeg_size: {e}"))?;
            Ok(bytes.len() as FLOAT / 1000.0)
        });
    api!(fn "png_size", "img.png_size() -> float", "Size in kB (1000 bytes) of the image encoded as PNG.",
        |img: &mut Image| -> Res<FLOAT> {
            let mut bytes = Cursor::new(Vec::new());
            img.0.write_to(&mut bytes, image::ImageFormat::Png).map_err(|e| format!("png_size: {e}"))?;
            Ok(bytes.into_inner().len() as FLOAT / 1000.0)
        });

    // --- shapes world's pixel judge (what `ddpo eval` reports) ---
    api!(fn "judge", "judge(img, prompt) -> #{background, shape_colour, both}",
        "Shapes world's pixel-level prompt-fidelity check of an image against a shapes-world caption: 1.0 where the background colour(s) read from the border, the main shape colour and both are right, else 0.0. An error for a caption outside the shapes-world grammar.",
        |img: Image, prompt: &str| -> Res<Map> {
            let spec = crate::world::parse_caption(prompt).ok_or_else(|| format!("judge(): {prompt:?} is not a shapes-world caption"))?;
            let j = crate::world::judge(img.rgb(), &spec);
            let flag = |ok: bool| Dynamic::from_float(if ok { 1.0 } else { 0.0 });
            let mut out = Map::new();
            out.insert("background".into(), flag(j.background_ok));
            out.insert("shape_colour".into(), flag(j.shape_colour_ok));
            out.insert("both".into(), flag(j.passed()));
            Ok(out)
        });

    // --- learned scorers (the run's CLIP and aesthetic models, loaded on first use) ---
    let m = models.clone();
    api!(fn "aesthetic", "aesthetic(img) -> float",
        "Aesthetic score of an image: the aesthetic head on the CLIP image embedding. By default the shipped shapes-world head (a procedural composition score, about 0..10); with `ddpo train --clip --aesthetic` the LAION predictor (about 1..10).",
        move |img: Image| -> Res<FLOAT> { learned(m.get().and_then(|m| m.aesthetic(img.rgb())), "aesthetic()") });
    let m = models.clone();
    api!(fn "clip_similarity", "clip_similarity(img, text) -> float",
        "Cosine similarity (-1..1) of the CLIP embeddings of an image and a text. By default the shipped shapes-world CLIP; `ddpo train --clip PATH` for real CLIP weights.",
        move |img: Image, text: &str| -> Res<FLOAT> {
            learned(m.get().and_then(|m| m.clip_similarity(img.rgb(), &[text])).map(|v| v[0]), "clip_similarity()")
        });
    let m = models;
    api!(fn "clip_similarity", "clip_similarity(img, [text, ..]) -> [float]",
        "Cosine similarities of an image to each text of an array (one batched text pass).",
        move |img: Image, texts: Array| -> Res<Array> {
            let texts: Vec<String> = texts
                .into_iter()
                .map(|t| t.into_immutable_string().map(|s| s.to_string()).map_err(|ty| format!("clip_similarity(): texts must be strings, got {ty}")))
                .collect::<Result<_, _>>()?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let sims = learned(m.get().and_then(|m| m.clip_similarity(img.rgb(), &refs)), "clip_similarity()")?;
            Ok(sims.into_iter().map(Dynamic::from_float).collect())
        });

    // --- seeded randomness (prompt scripts only) ---
    api!(fn "rand", "rand() -> float", "Uniform number in [0, 1) from the run's seeded generator. Prompt scripts only.",
        || -> Res<FLOAT> { draw("rand()", |r| Ok(r.random::<f64>())) });
    api!(fn "rand_int", "rand_int(a, b) -> int", "Uniform integer in a..=b (both included) from the run's generator. Prompt scripts only.",
        |a: INT, b: INT| -> Res<INT> {
            if a > b {
                return Err(format!("rand_int({a}, {b}): a must not be greater than b").into());
            }
            draw("rand_int()", |r| Ok(r.random_range(a..=b)))
        });
    api!(fn "choice", "choice(array) -> value", "One element of a non-empty array, uniformly, from the run's generator. Prompt scripts only.",
        |items: Array| -> Res<Dynamic> {
            if items.is_empty() {
                return Err("choice(): the array is empty".into());
            }
            draw("choice()", |r| Ok(items[r.random_range(0..items.len())].clone()))
        });
    api!(fn "weighted_choice", "weighted_choice(map) -> string",
        "A key of `#{ key: weight, .. }` with probability proportional to its (non-negative) weight, from the run's generator. Prompt scripts only.",
        |weights: Map| -> Res<rhai::ImmutableString> {
            let mut total = 0.0;
            for (k, v) in &weights {
                match number(v) {
                    Some(w) if w >= 0.0 && w.is_finite() => total += w,
                    _ => return Err(format!("weighted_choice(): the weight of {k:?} is not a non-negative number").into()),
                }
            }
            if total <= 0.0 {
                return Err("weighted_choice(): the weights must not all be zero".into());
            }
            draw("weighted_choice()", |r| {
                let mut x = r.random::<f64>() * total;
                let mut last = None;
                for (k, v) in &weights {
                    let w = number(v).unwrap_or(0.0);
                    if w > 0.0 {
                        last = Some(k);
                        if x < w {
                            return Ok(k.as_str().into());
                        }
                        x -= w;
                    }
                }
                Ok(last.expect("a positive weight").as_str().into())
            })
        });

    // --- the run ---
    api!(fn "context", "context() -> map",
        "Read-only facts about the run: `epoch` (the epoch about to run, from 0), `step` (optimiser steps taken so far), `reward_mean` and `reward_std` (arrays, one entry per finished epoch).",
        move || -> Map { context.read().unwrap().to_map() });
    docs
}

fn mean_rgb(img: &RgbImage) -> [f64; 3] {
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
fn hsv([r, g, b]: [u8; 3]) -> (f64, f64, f64) {
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

/// The documentation of the host API, in registration order.
pub fn entries() -> Vec<ApiEntry> {
    register(&mut Engine::new_raw(), Arc::default(), LazyModels::default())
}

/// `scripts/API.md`: the host API as Markdown, generated from [`register`].
pub fn markdown() -> String {
    let mut out = String::from(
        "# Script host API\n\n\
         Generated from `src/script/api.rs` (`ddpo::script::api::markdown()`); a test keeps this file in sync.\n\n\
         Reward scripts define `fn reward(img, prompt, meta)` returning a number or a map of named\n\
         components with a `total`. Prompt scripts define `fn prompt()` returning a string or\n\
         `#{ prompt: \"..\", meta: #{ .. } }`; the reward receives that `meta`. Scripts may `import`\n\
         other `.rhai` files from their own folder only. `print` and `debug` go to the training log.\n\n\
         | function | description |\n|---|---|\n",
    );
    for e in entries() {
        out.push_str(&format!("| `{}` | {} |\n", e.signature, e.doc));
    }
    out
}
