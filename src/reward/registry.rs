//! The reward primitives: every function a reward script can call on images, declared once here
//! with its name, signature, doc, parameter types and the learned models it needs. The script
//! layer registers them from [`SECTIONS`] (adapting arguments and results to Rhai) and generates
//! `scripts/API.md` from the same table; which models a script needs prefetched is [`needs`] of
//! the primitives it calls.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use image::RgbImage;

use super::models::LazyModels;
use super::{jpeg, pixels, stats};

/// The learned models a primitive reads; ordered, so the combined need of a script is the max.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Needs {
    Nothing,
    /// CLIP image and text embeddings.
    Clip,
    /// The aesthetic head, which reads CLIP's image embeddings.
    Aesthetic,
}

/// How a primitive is called: `img.width` (a property) or `name(args)` / `img.name(args)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Getter,
    Call,
}

/// The type of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Image,
    Int,
    Text,
    /// An array of strings.
    Texts,
}

/// One argument, as the script layer hands it over.
#[derive(Debug, Clone)]
pub enum Arg {
    Image(Arc<RgbImage>),
    Int(i64),
    Text(String),
    Texts(Vec<String>),
}

/// A primitive's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Floats(Vec<f64>),
    /// A new image (the script layer charges its pixels to the call's budget).
    Image(RgbImage),
    /// Named numbers (a map in scripts).
    Map(BTreeMap<String, f64>),
    Text(String),
    /// An array in scripts.
    List(Vec<Value>),
    /// Named values of any kind (a map in scripts).
    Record(BTreeMap<String, Value>),
}

/// The arguments of one call and the run's models.
pub struct Args<'a> {
    pub args: &'a [Arg],
    pub models: &'a LazyModels,
}

impl Args<'_> {
    fn get(&self, i: usize) -> anyhow::Result<&Arg> {
        self.args.get(i).with_context(|| format!("argument {} is missing", i + 1))
    }

    pub fn image(&self, i: usize) -> anyhow::Result<&RgbImage> {
        match self.get(i)? {
            Arg::Image(img) => Ok(img),
            other => anyhow::bail!("argument {} is {other:?}, not an image", i + 1),
        }
    }

    pub fn int(&self, i: usize) -> anyhow::Result<i64> {
        match self.get(i)? {
            Arg::Int(v) => Ok(*v),
            other => anyhow::bail!("argument {} is {other:?}, not an integer", i + 1),
        }
    }

    pub fn text(&self, i: usize) -> anyhow::Result<&str> {
        match self.get(i)? {
            Arg::Text(t) => Ok(t),
            other => anyhow::bail!("argument {} is {other:?}, not a string", i + 1),
        }
    }

    pub fn texts(&self, i: usize) -> anyhow::Result<Vec<&str>> {
        match self.get(i)? {
            Arg::Texts(t) => Ok(t.iter().map(String::as_str).collect()),
            other => anyhow::bail!("argument {} is {other:?}, not an array of strings", i + 1),
        }
    }
}

/// One documented reward primitive.
pub struct Primitive {
    pub name: &'static str,
    /// As scripts write it, e.g. `img.crop(x, y, w, h) -> Image`.
    pub signature: &'static str,
    pub doc: &'static str,
    pub form: Form,
    pub params: &'static [Param],
    pub needs: Needs,
    pub run: fn(&Args) -> anyhow::Result<Value>,
}

/// Primitives documented together under one heading.
pub struct Section {
    pub heading: &'static str,
    pub primitives: &'static [Primitive],
}

/// Every reward primitive, by section.
pub fn primitives() -> impl Iterator<Item = &'static Primitive> {
    SECTIONS.iter().flat_map(|s| s.primitives.iter())
}

/// The models a script needs that calls the functions `called` (other names are ignored).
pub fn needs<'a>(called: impl IntoIterator<Item = &'a str>) -> Needs {
    let called: Vec<&str> = called.into_iter().collect();
    primitives().filter(|p| called.contains(&p.name)).map(|p| p.needs).max().unwrap_or(Needs::Nothing)
}

fn floats<const N: usize>(v: [f64; N]) -> Value {
    Value::Floats(v.to_vec())
}

const IMG: &[Param] = &[Param::Image];

/// The reward primitives. A flat table: one entry per function scripts see.
pub static SECTIONS: &[Section] = &[
    Section {
        heading: "Images (`reward::pixels`)",
        primitives: &[
            Primitive { name: "width", signature: "img.width -> int", doc: "Image width in pixels.",
                form: Form::Getter, params: IMG, needs: Needs::Nothing, run: |a| Ok(Value::Int(a.image(0)?.width() as i64)) },
            Primitive { name: "height", signature: "img.height -> int", doc: "Image height in pixels.",
                form: Form::Getter, params: IMG, needs: Needs::Nothing, run: |a| Ok(Value::Int(a.image(0)?.height() as i64)) },
            Primitive { name: "pixel", signature: "img.pixel(x, y) -> [r, g, b]", doc: "Colour of one pixel, channels in 0..1; (0, 0) is the top left.",
                form: Form::Call, params: &[Param::Image, Param::Int, Param::Int], needs: Needs::Nothing,
                run: |a| Ok(floats(pixels::pixel(a.image(0)?, a.int(1)?, a.int(2)?)?)) },
            Primitive { name: "mean_rgb", signature: "img.mean_rgb() -> [r, g, b]", doc: "Mean colour over all pixels, channels in 0..1.",
                form: Form::Call, params: IMG, needs: Needs::Nothing, run: |a| Ok(floats(pixels::mean_rgb(a.image(0)?))) },
            Primitive { name: "brightness", signature: "img.brightness() -> float", doc: "Mean of all channels of all pixels, in 0..1.",
                form: Form::Call, params: IMG, needs: Needs::Nothing, run: |a| Ok(Value::Float(stats::mean_brightness(a.image(0)?))) },
            Primitive { name: "saturation", signature: "img.saturation() -> float", doc: "Mean HSV saturation, in 0..1 (0 for a grey image).",
                form: Form::Call, params: IMG, needs: Needs::Nothing, run: |a| Ok(Value::Float(pixels::saturation(a.image(0)?))) },
            Primitive { name: "hue_histogram", signature: "img.hue_histogram(bins) -> [float]",
                doc: "Fraction of coloured pixels (saturation >= 0.1) in each of `bins` equal hue ranges starting at red; all zeros for a grey image.",
                form: Form::Call, params: &[Param::Image, Param::Int], needs: Needs::Nothing,
                run: |a| Ok(Value::Floats(pixels::hue_histogram(a.image(0)?, a.int(1)?)?)) },
            Primitive { name: "to_gray", signature: "img.to_gray() -> Image", doc: "Greyscale copy (luma, Rec. 601 weights) with three equal channels.",
                form: Form::Call, params: IMG, needs: Needs::Nothing, run: |a| Ok(Value::Image(pixels::to_gray(a.image(0)?))) },
            Primitive { name: "crop", signature: "img.crop(x, y, w, h) -> Image", doc: "The w x h rectangle whose top left is (x, y); it must lie inside the image.",
                form: Form::Call, params: &[Param::Image, Param::Int, Param::Int, Param::Int, Param::Int], needs: Needs::Nothing,
                run: |a| Ok(Value::Image(pixels::crop(a.image(0)?, a.int(1)?, a.int(2)?, a.int(3)?, a.int(4)?)?)) },
            Primitive { name: "resize", signature: "img.resize(w, h) -> Image", doc: "Resized copy (bilinear), 1 to 1024 pixels a side.",
                form: Form::Call, params: &[Param::Image, Param::Int, Param::Int], needs: Needs::Nothing,
                run: |a| Ok(Value::Image(pixels::resize(a.image(0)?, a.int(1)?, a.int(2)?)?)) },
            Primitive { name: "jpeg_size", signature: "img.jpeg_size(quality) -> float",
                doc: "Size in kB (1000 bytes) of the image encoded as JPEG at `quality` (1..100); jpeg_size(95) is the DDPO compressibility measure.",
                form: Form::Call, params: &[Param::Image, Param::Int], needs: Needs::Nothing,
                run: |a| Ok(Value::Float(jpeg::jpeg_kb_at(a.image(0)?, a.int(1)?)?)) },
            Primitive { name: "png_size", signature: "img.png_size() -> float", doc: "Size in kB (1000 bytes) of the image encoded as PNG.",
                form: Form::Call, params: IMG, needs: Needs::Nothing, run: |a| Ok(Value::Float(pixels::png_kb(a.image(0)?)?)) },
        ],
    },
    Section {
        heading: "Shapes world's pixel judge (what `ddpo eval` reports)",
        primitives: &[Primitive { name: "judge", signature: "judge(img, prompt) -> #{background, shape_colour, both}",
            doc: "Shapes world's pixel-level prompt-fidelity check of an image against a shapes-world caption: 1.0 where the background colour(s) read from the border, the main shape colour and both are right, else 0.0. An error for a caption outside the shapes-world grammar.",
            form: Form::Call, params: &[Param::Image, Param::Text], needs: Needs::Nothing, run: judge }],
    },
    Section {
        heading: "Shapes world's object detector and compositional score (what `ddpo eval --suite` reports)",
        primitives: &[
            Primitive { name: "detect", signature: "detect(img) -> #{background, objects}",
                doc: "The shapes detector's reading of an image: `background`, the background colour names; `objects`, one map per object with `colour`, `shape` (\"\" for an unrecognised blob), `area` (pixels), `x`, `y` (centroid, 0..1 of the width and height), `width`, `height` (pixels).",
                form: Form::Call, params: IMG, needs: Needs::Nothing, run: detect },
            Primitive { name: "geneval", signature: "geneval(img, prompt) -> #{strict, partial, shape_fit, count, colour, position, background}",
                doc: "GenEval's score of an image against a shapes-world caption, by the shapes detector: `strict` 1.0 when every clause is right (exact counts, colours, positions, background), `partial` the mean of the clause terms as Flow-GRPO's reward computes them (count credit 1 - |n - target| / target), `shape_fit` a dense term beside them (the mean over the objects asked for of their class template's overlap, 0..1, blobs included: how well the shapes are drawn), and the mean term of each clause kind the caption has. An error for a caption outside the grammar.",
                form: Form::Call, params: &[Param::Image, Param::Text], needs: Needs::Nothing, run: geneval },
        ],
    },
    Section {
        heading: "Learned scorers (`reward::models`: the run's CLIP and aesthetic models, loaded on first use)",
        primitives: &[
            Primitive { name: "aesthetic", signature: "aesthetic(img) -> float",
                doc: "Aesthetic score of an image: the aesthetic head on the CLIP image embedding. By default the shipped shapes-world head (a procedural composition score, about 0..10); with `ddpo train --clip --aesthetic` the LAION predictor (about 1..10).",
                form: Form::Call, params: IMG, needs: Needs::Aesthetic,
                run: |a| Ok(Value::Float(a.models.get().and_then(|m| m.aesthetic(a.image(0)?)).context("aesthetic()")?)) },
            Primitive { name: "clip_similarity", signature: "clip_similarity(img, text) -> float",
                doc: "Cosine similarity (-1..1) of the CLIP embeddings of an image and a text. By default the shipped shapes-world CLIP; `ddpo train --clip PATH` for real CLIP weights.",
                form: Form::Call, params: &[Param::Image, Param::Text], needs: Needs::Clip,
                run: |a| clip_similarity(a, &[a.text(1)?]).map(|v| Value::Float(v[0])) },
            Primitive { name: "clip_similarity", signature: "clip_similarity(img, [text, ..]) -> [float]",
                doc: "Cosine similarities of an image to each text of an array (one batched text pass).",
                form: Form::Call, params: &[Param::Image, Param::Texts], needs: Needs::Clip,
                run: |a| clip_similarity(a, &a.texts(1)?).map(Value::Floats) },
            Primitive { name: "text_similarity", signature: "text_similarity(a, b) -> float",
                doc: "Cosine similarity (-1..1) of the CLIP text embeddings of two texts, e.g. a VLM's description of an image and the prompt (the DDPO paper's alignment task compares them with BERTScore). The run's CLIP, as `clip_similarity`; the shipped small CLIP reads shapes-world words only.",
                form: Form::Call, params: &[Param::Text, Param::Text], needs: Needs::Clip, run: text_similarity },
        ],
    },
    Section {
        heading: "Vision-language models (`reward::vlm`: the endpoint `ddpo train --vlm URL` configures)",
        primitives: VLM_PRIMITIVES,
    },
];

/// The primitives that ask the run's vision-language model: they wait on the network (bounded by
/// the client's own timeouts, so the script layer takes their time off a call's deadline) and
/// a batch of a script that calls them is scored on parallel threads.
pub static VLM_PRIMITIVES: &[Primitive] = &[
    Primitive { name: "vlm_ask", signature: "vlm_ask(img, question) -> string",
        doc: "The reply of the run's vision-language model (`ddpo train --vlm URL`, an OpenAI-compatible server) to `question` about the image, at temperature 0 with a fixed seed; cached per image, question and model for the run. Scripts reach only that endpoint. An error when no `--vlm` is configured, or when the server fails, times out or replies malformed after its retries.",
        form: Form::Call, params: &[Param::Image, Param::Text], needs: Needs::Nothing,
        run: |a| Ok(Value::Text(a.models.vlm()?.ask(a.image(0)?, a.text(1)?).context("vlm_ask()")?)) },
    Primitive { name: "vlm_score", signature: "vlm_score(img, question, pattern) -> float",
        doc: "A number read from the model's reply to `question` (as `vlm_ask`): `pattern` is a regular expression (Rust regex syntax); the score is the number its first capture group holds if it has one, else the first number after its first match (\"Final Score:\" reads 7.5 from \"Final Score: 7.5\"; \"\" the reply's first number). An error, quoting the reply, when there is none.",
        form: Form::Call, params: &[Param::Image, Param::Text, Param::Text], needs: Needs::Nothing, run: vlm_score },
];

/// Whether a script calling the functions `called` asks the VLM.
pub fn uses_vlm<'a>(called: impl IntoIterator<Item = &'a str>) -> bool {
    called.into_iter().any(|name| VLM_PRIMITIVES.iter().any(|p| p.name == name))
}

/// Whether `p` asks the VLM.
pub fn is_remote(p: &Primitive) -> bool {
    VLM_PRIMITIVES.iter().any(|v| std::ptr::eq(v, p))
}

fn vlm_score(a: &Args) -> anyhow::Result<Value> {
    let reply = a.models.vlm()?.ask(a.image(0)?, a.text(1)?).context("vlm_score()")?;
    super::vlm::parse_score(&reply, a.text(2)?).context("vlm_score()").map(Value::Float)
}

fn text_similarity(a: &Args) -> anyhow::Result<Value> {
    let s = a.models.get().and_then(|m| m.text_similarity(a.text(0)?, a.text(1)?)).context("text_similarity()")?;
    Ok(Value::Float(s))
}

fn clip_similarity(a: &Args, texts: &[&str]) -> anyhow::Result<Vec<f64>> {
    a.models.get().and_then(|m| m.clip_similarity(a.image(0)?, texts)).context("clip_similarity()")
}

fn detect(a: &Args) -> anyhow::Result<Value> {
    let img = a.image(0)?;
    let d = crate::world::detect::detect(img);
    let (w, h) = (img.width() as f64, img.height() as f64);
    let object = |o: &crate::world::detect::Object| {
        let number = |k: &str, v: f64| (k.to_string(), Value::Float(v));
        Value::Record(BTreeMap::from([
            ("colour".to_string(), Value::Text(o.colour.name().to_string())),
            ("shape".to_string(), Value::Text(o.shape.map(|s| s.name()).unwrap_or("").to_string())),
            number("area", o.area as f64),
            number("x", o.centroid.0 as f64 / w),
            number("y", o.centroid.1 as f64 / h),
            number("width", o.width() as f64),
            number("height", o.height() as f64),
        ]))
    };
    let background = d.background.iter().map(|c| Value::Text(c.name().to_string())).collect();
    Ok(Value::Record(BTreeMap::from([
        ("background".to_string(), Value::List(background)),
        ("objects".to_string(), Value::List(d.objects.iter().map(object).collect())),
    ])))
}

fn geneval(a: &Args) -> anyhow::Result<Value> {
    let s = crate::world::geneval::geneval(a.image(0)?, a.text(1)?).context("geneval()")?;
    let mut map = BTreeMap::from([("strict".to_string(), if s.strict { 1.0 } else { 0.0 }), ("partial".to_string(), s.partial), ("shape_fit".to_string(), s.shape_fit)]);
    for kind in crate::world::geneval::ClauseKind::ALL {
        let credits: Vec<f64> = s.verdicts.iter().filter(|v| v.kind == kind).map(|v| v.credit).collect();
        if !credits.is_empty() {
            map.insert(kind.name().to_string(), credits.iter().sum::<f64>() / credits.len() as f64);
        }
    }
    Ok(Value::Map(map))
}

fn judge(a: &Args) -> anyhow::Result<Value> {
    let prompt = a.text(1)?;
    let spec = crate::world::parse_caption(prompt).with_context(|| format!("judge(): {prompt:?} is not a shapes-world caption"))?;
    let j = crate::world::judge(a.image(0)?, &spec);
    let flag = |ok: bool| if ok { 1.0 } else { 0.0 };
    let map = [("background", j.background_ok), ("shape_colour", j.shape_colour_ok), ("both", j.passed())];
    Ok(Value::Map(map.into_iter().map(|(k, ok)| (k.to_string(), flag(ok))).collect()))
}
