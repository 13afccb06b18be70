//! Runs the compositional suite ([`crate::world::suite`]) on a policy: samples each prompt
//! `per_prompt` times with one fixed noise seed, scores every image with the detector
//! ([`crate::world::geneval`]) and summarises strict and partial scores per category and
//! overall (the mean of the categories, as GenEval reports).

use std::path::{Path, PathBuf};

use anyhow::Context;
use image::RgbImage;
use serde::Serialize;

use crate::family::Family;
use crate::sampler::sample_images_with_range;
use crate::sampler::SamplerConfig;
use crate::world::detect::{detect, Detection};
use crate::world::geneval::{score, ClauseKind, Score};
use crate::world::suite::{Category, Half, SuitePrompt};

/// Images sampled per batch.
const BATCH: usize = 50;
/// Prompts shown per category in a grid (the first ones, each with all its samples).
pub const GRID_PROMPTS: usize = 16;

/// How to run the suite.
#[derive(Clone, Debug)]
pub struct SuiteOptions {
    /// The suite's name as reported (e.g. `compositional-v1`).
    pub suite: String,
    /// Only this half of the prompts; `None` for all.
    pub half: Option<Half>,
    pub per_prompt: usize,
    /// Noise seed of the whole run: the same prompts, options and seed give the same images.
    pub seed: u64,
    pub sampler: SamplerConfig,
}

/// One scored sample.
#[derive(Clone, Debug)]
pub struct SuiteSample {
    /// Index into the run's prompts.
    pub prompt: usize,
    pub image: RgbImage,
    /// What the detector saw in `image`.
    pub detection: Detection,
    pub score: Score,
}

/// A finished run: the selected prompts, every sample and the summary.
#[derive(Clone, Debug)]
pub struct SuiteRun {
    pub prompts: Vec<SuitePrompt>,
    pub samples: Vec<SuiteSample>,
    pub report: SuiteReport,
}

/// The suite's scores, as printed (JSON) and tabulated (markdown).
#[derive(Clone, Debug, Serialize)]
pub struct SuiteReport {
    pub suite: String,
    pub half: Option<Half>,
    pub per_prompt: usize,
    pub seed: u64,
    pub steps: usize,
    pub eta: f64,
    pub guidance: f64,
    pub prompts: usize,
    pub images: usize,
    /// Mean over categories of the share of images with every clause right.
    pub strict: f64,
    /// Mean over categories of the mean partial score.
    pub partial: f64,
    pub categories: Vec<CategoryScore>,
    /// Share of clauses right, per clause type, over all images.
    pub clauses: Vec<ClauseAccuracy>,
    /// Share of the final samples' values outside the pixel range (what the images clamp
    /// away): a model that leans on clamping shows it here. NaN (null) where not measured.
    pub out_of_range: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CategoryScore {
    pub category: Category,
    pub prompts: usize,
    pub images: usize,
    pub strict: f64,
    pub partial: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClauseAccuracy {
    pub clause: ClauseKind,
    pub checked: usize,
    pub right: f64,
}

/// The prompts of `half` (all for `None`), in suite order.
pub fn select(prompts: &[SuitePrompt], half: Option<Half>) -> Vec<SuitePrompt> {
    prompts.iter().filter(|p| half.is_none_or(|h| p.half == h)).cloned().collect()
}

/// Samples and scores the suite's `prompts` (already selected) with `policy`.
pub fn run_suite(policy: &dyn Family, prompts: Vec<SuitePrompt>, opts: &SuiteOptions) -> anyhow::Result<SuiteRun> {
    anyhow::ensure!(opts.per_prompt > 0, "--per-prompt must be at least 1");
    let texts: Vec<String> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.text.clone(), opts.per_prompt)).collect();
    let (images, out_of_range) = sample_images_with_range(policy, &texts, &opts.sampler, opts.seed, BATCH).context("sampling the suite's prompts")?;
    let mut run = score_suite(prompts, images, opts);
    run.report.out_of_range = out_of_range;
    Ok(run)
}

/// Scores `images` (`per_prompt` per prompt, in prompt order) against their prompts.
pub fn score_suite(prompts: Vec<SuitePrompt>, images: Vec<RgbImage>, opts: &SuiteOptions) -> SuiteRun {
    let samples: Vec<SuiteSample> = images
        .into_iter()
        .enumerate()
        .map(|(i, image)| {
            let prompt = i / opts.per_prompt.max(1);
            let detection = detect(&image);
            let score = score(&prompts[prompt].clauses, &detection);
            SuiteSample { prompt, image, detection, score }
        })
        .collect();
    let report = summarise(&prompts, &samples, opts);
    SuiteRun { prompts, samples, report }
}

fn summarise(prompts: &[SuitePrompt], samples: &[SuiteSample], opts: &SuiteOptions) -> SuiteReport {
    let categories: Vec<CategoryScore> = Category::ALL
        .into_iter()
        .filter_map(|category| {
            let of: Vec<&SuiteSample> = samples.iter().filter(|s| prompts[s.prompt].category == category).collect();
            let n = of.len();
            (n > 0).then(|| CategoryScore {
                category,
                prompts: prompts.iter().filter(|p| p.category == category).count(),
                images: n,
                strict: of.iter().filter(|s| s.score.strict).count() as f64 / n as f64,
                partial: of.iter().map(|s| s.score.partial).sum::<f64>() / n as f64,
            })
        })
        .collect();
    let mean = |f: fn(&CategoryScore) -> f64| categories.iter().map(f).sum::<f64>() / categories.len().max(1) as f64;
    SuiteReport {
        suite: opts.suite.clone(),
        half: opts.half,
        per_prompt: opts.per_prompt,
        seed: opts.seed,
        steps: opts.sampler.steps,
        eta: opts.sampler.eta,
        guidance: opts.sampler.guidance,
        prompts: prompts.len(),
        images: samples.len(),
        strict: mean(|c| c.strict),
        partial: mean(|c| c.partial),
        clauses: clause_accuracy(samples),
        categories,
        out_of_range: f64::NAN,
    }
}

fn clause_accuracy(samples: &[SuiteSample]) -> Vec<ClauseAccuracy> {
    ClauseKind::ALL
        .into_iter()
        .filter_map(|clause| {
            let verdicts: Vec<bool> = samples.iter().flat_map(|s| s.score.verdicts.iter().filter(|v| v.kind == clause).map(|v| v.ok)).collect();
            let checked = verdicts.len();
            (checked > 0).then(|| ClauseAccuracy { clause, checked, right: verdicts.iter().filter(|&&ok| ok).count() as f64 / checked as f64 })
        })
        .collect()
}

impl SuiteReport {
    /// A markdown table: per category and overall, strict and partial, in percent.
    pub fn markdown(&self) -> String {
        let half = self.half.map_or("all prompts".to_string(), |h| format!("the {} half", h.name()));
        let mut out = format!(
            "Suite {} ({half}, {} prompts x {} samples, seed {}; {} sampling steps, eta {} (a flow model: its noise level, 0 = the ODE), guidance {})\n\n",
            self.suite, self.prompts, self.per_prompt, self.seed, self.steps, self.eta, self.guidance
        );
        out.push_str("| category | prompts | images | strict | partial |\n|---|---:|---:|---:|---:|\n");
        for c in &self.categories {
            out.push_str(&format!("| {} | {} | {} | {:.1}% | {:.1}% |\n", c.category.name(), c.prompts, c.images, 100.0 * c.strict, 100.0 * c.partial));
        }
        out.push_str(&format!("| **overall** (mean of categories) | {} | {} | **{:.1}%** | **{:.1}%** |\n", self.prompts, self.images, 100.0 * self.strict, 100.0 * self.partial));
        if self.out_of_range.is_finite() {
            out.push_str(&format!("\nFinal sample values outside [-1, 1]: {:.1}%\n", 100.0 * self.out_of_range));
        }
        out
    }
}

/// Writes one labelled grid per category into `dir` (`<category>.png`): the first
/// [`GRID_PROMPTS`] prompts, a row each, every sample marked `ok` or `x` (strict).
pub fn write_grids(run: &SuiteRun, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the grid folder {}; check the path and permissions", dir.display()))?;
    let mut written = Vec::new();
    for category in Category::ALL {
        let chosen: Vec<usize> = (0..run.prompts.len()).filter(|&i| run.prompts[i].category == category).take(GRID_PROMPTS).collect();
        let samples: Vec<&SuiteSample> = run.samples.iter().filter(|s| chosen.contains(&s.prompt)).collect();
        if samples.is_empty() {
            continue;
        }
        let images: Vec<RgbImage> = samples.iter().map(|s| s.image.clone()).collect();
        let labels: Vec<String> =
            samples.iter().map(|s| format!("[{}] {}", if s.score.strict { "ok" } else { "x" }, run.prompts[s.prompt].text)).collect();
        let path = dir.join(format!("{}.png", category.name()));
        crate::render::save_png(&crate::render::labelled_grid(&images, &labels, run.report.per_prompt, 3), &path)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes every sample of `run` into `dir` as `<index>.png`, and `samples.jsonl` with a line per
/// sample: the file, prompt, category, strict and partial score, and the detector's objects.
pub fn write_samples(run: &SuiteRun, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the samples folder {}; check the path and permissions", dir.display()))?;
    let mut lines = String::new();
    for (i, sample) in run.samples.iter().enumerate() {
        let file = format!("{i:05}.png");
        crate::render::save_png(&sample.image, &dir.join(&file))?;
        let prompt = &run.prompts[sample.prompt];
        let line = serde_json::json!({
            "file": file,
            "prompt": prompt.text,
            "category": prompt.category,
            "strict": sample.score.strict,
            "partial": sample.score.partial,
            "detection": sample.detection,
        });
        lines.push_str(&format!("{line}\n"));
    }
    let path = dir.join("samples.jsonl");
    std::fs::write(&path, lines).with_context(|| format!("cannot write {}; check the disk", path.display()))
}
