//! Two models on the compositional suite with the same prompts and the same noise: the change of
//! the strict score per category and overall, with a bootstrap confidence interval over prompts.
//! Because both runs start every image from the same noise, their images are paired, and the
//! interval is far narrower than the difference of two independent scores would allow; it is the
//! answer to "did training raise the held-out score, or is this noise?".

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::eval::suite::SuiteRun;
use crate::world::suite::Category;

/// Bootstrap resamples behind each interval.
const RESAMPLES: usize = 2000;

/// One row of the comparison: a category, or the overall mean of categories.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// `None` for the overall row.
    pub category: Option<Category>,
    pub prompts: usize,
    pub baseline: f64,
    pub model: f64,
    /// model - baseline (strict, as a share of images).
    pub change: f64,
    /// 95% bootstrap interval of `change` (prompts resampled within each category).
    pub low: f64,
    pub high: f64,
}

/// The paired comparison of two suite runs.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub categories: Vec<Change>,
    pub overall: Change,
    pub resamples: usize,
}

/// Strict passes per prompt of one run, with each prompt's category: what a paired comparison
/// needs of a suite run or of a training run's gold evaluation.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Passes {
    pub categories: Vec<Category>,
    /// Images with every clause right, per prompt.
    pub passes: Vec<usize>,
    pub per_prompt: usize,
}

impl Passes {
    /// The strict passes per prompt of a suite run.
    pub fn of_run(run: &SuiteRun) -> Self {
        let mut passes = vec![0; run.prompts.len()];
        run.samples.iter().filter(|s| s.score.strict).for_each(|s| passes[s.prompt] += 1);
        Self { categories: run.prompts.iter().map(|p| p.category).collect(), passes, per_prompt: run.report.per_prompt }
    }
}

/// Per category, each prompt's strict passes (model minus baseline) as a share of its images.
fn prompt_changes(baseline: &Passes, model: &Passes) -> anyhow::Result<Vec<(Category, Vec<f64>)>> {
    anyhow::ensure!(
        baseline.categories == model.categories && baseline.passes.len() == model.passes.len() && baseline.per_prompt == model.per_prompt,
        "the two runs differ in prompts or samples per prompt; a paired comparison needs the same ones"
    );
    let per_prompt = model.per_prompt.max(1) as f64;
    Ok(Category::ALL
        .into_iter()
        .map(|c| {
            let changes = (0..model.passes.len())
                .filter(|&i| model.categories[i] == c)
                .map(|i| (model.passes[i] as f64 - baseline.passes[i] as f64) / per_prompt)
                .collect::<Vec<_>>();
            (c, changes)
        })
        .filter(|(_, changes)| !changes.is_empty())
        .collect())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The 2.5% and 97.5% quantiles of `draws`.
fn interval(mut draws: Vec<f64>) -> (f64, f64) {
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| draws[((q * (draws.len() - 1) as f64).round() as usize).min(draws.len() - 1)];
    (at(0.025), at(0.975))
}

/// Compares `model` with `baseline` (same prompts, samples per prompt and seed). The overall row
/// is the mean of the categories' changes, as the suite's overall score is the mean of theirs;
/// its interval resamples prompts within every category at once.
pub fn compare(baseline: &SuiteRun, model: &SuiteRun, seed: u64) -> anyhow::Result<Comparison> {
    let same = baseline.prompts.iter().map(|p| &p.text).eq(model.prompts.iter().map(|p| &p.text)) && baseline.report.seed == model.report.seed;
    anyhow::ensure!(same, "the two suite runs differ in prompts, samples per prompt or seed; a paired comparison needs the same ones");
    paired_change(&Passes::of_run(baseline), &Passes::of_run(model), seed)
}

/// The paired change of the strict score from `baseline` to `model`, per category and overall
/// (the mean of the categories), each with its bootstrap interval over prompts.
pub fn paired_change(baseline: &Passes, model: &Passes, seed: u64) -> anyhow::Result<Comparison> {
    let per_category = prompt_changes(baseline, model)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // draws[c][r]: category c's mean change in resample r.
    let draws: Vec<Vec<f64>> = per_category
        .iter()
        .map(|(_, changes)| (0..RESAMPLES).map(|_| mean(&(0..changes.len()).map(|_| changes[rng.random_range(0..changes.len())]).collect::<Vec<_>>())).collect())
        .collect();
    let strict = |p: &Passes, c: Category| {
        let of: Vec<usize> = (0..p.passes.len()).filter(|&i| p.categories[i] == c).map(|i| p.passes[i]).collect();
        of.iter().sum::<usize>() as f64 / (of.len() * p.per_prompt.max(1)) as f64
    };
    let categories: Vec<Change> = per_category
        .iter()
        .zip(&draws)
        .map(|((c, changes), draws)| {
            let (low, high) = interval(draws.clone());
            Change { category: Some(*c), prompts: changes.len(), baseline: strict(baseline, *c), model: strict(model, *c), change: mean(changes), low, high }
        })
        .collect();
    let overall_draws = (0..RESAMPLES).map(|r| mean(&draws.iter().map(|d| d[r]).collect::<Vec<_>>())).collect();
    let (low, high) = interval(overall_draws);
    let overall = Change {
        category: None,
        prompts: categories.iter().map(|c| c.prompts).sum(),
        baseline: mean(&categories.iter().map(|c| c.baseline).collect::<Vec<_>>()),
        model: mean(&categories.iter().map(|c| c.model).collect::<Vec<_>>()),
        change: mean(&categories.iter().map(|c| c.change).collect::<Vec<_>>()),
        low,
        high,
    };
    Ok(Comparison { categories, overall, resamples: RESAMPLES })
}

impl Comparison {
    /// A markdown table in percentage points.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Strict score, model against baseline on the same prompts and noise; 95% interval from {} bootstrap resamples of the prompts\n\n| category | prompts | baseline | model | change | 95% interval |\n|---|---:|---:|---:|---:|---|\n",
            self.resamples
        );
        let row = |name: &str, c: &Change| {
            format!(
                "| {name} | {} | {:.1}% | {:.1}% | {:+.1} | {:+.1} .. {:+.1} |\n",
                c.prompts,
                100.0 * c.baseline,
                100.0 * c.model,
                100.0 * c.change,
                100.0 * c.low,
                100.0 * c.high
            )
        };
        for c in &self.categories {
            out.push_str(&row(c.category.map_or("", Category::name), c));
        }
        out.push_str(&row("**overall** (mean of categories)", &self.overall));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::suite::{score_suite, SuiteOptions};
    use crate::sampler::SamplerConfig;
    use crate::world::suite::{suite, LATEST};

    /// A suite run over the first prompts of each category whose images are each prompt's own
    /// ground-truth render where `right(i)` and a blank frame elsewhere.
    fn run(right: impl Fn(usize) -> bool) -> SuiteRun {
        let render = |text: &str, seed: u64| {
            let spec = crate::world::parse_caption(text).unwrap();
            crate::world::Scene::layout(&spec, 32, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed)).render(4)
        };
        let mut prompts = Vec::new();
        for c in Category::ALL {
            prompts.extend(suite(LATEST).unwrap().into_iter().filter(|p| p.category == c).take(10));
        }
        let per_prompt = 2;
        let images = (0..prompts.len() * per_prompt)
            .map(|i| {
                let p = &prompts[i / per_prompt];
                if right(i) { render(&p.text, i as u64) } else { image::RgbImage::new(32, 32) }
            })
            .collect();
        let opts = SuiteOptions { suite: LATEST.into(), half: None, per_prompt, seed: 0, sampler: SamplerConfig::default() };
        score_suite(prompts, images, &opts)
    }

    #[test]
    fn identical_runs_change_by_zero_with_a_zero_interval() {
        let a = run(|i| i % 3 == 0);
        let c = compare(&a, &a, 1).unwrap();
        assert_eq!((c.overall.change, c.overall.low, c.overall.high), (0.0, 0.0, 0.0));
    }

    #[test]
    fn a_model_that_fixes_every_image_gains_what_the_baseline_missed() {
        let (base, tuned) = (run(|i| i % 2 == 0), run(|_| true));
        let c = compare(&base, &tuned, 1).unwrap();
        for row in &c.categories {
            assert!((row.change - (row.model - row.baseline)).abs() < 1e-12, "{row:?}");
            assert!(row.low <= row.change && row.change <= row.high, "{row:?}");
        }
        assert!((c.overall.change - (tuned.report.strict - base.report.strict)).abs() < 1e-12);
        assert!(c.overall.low > 0.0, "every image fixed: the interval excludes zero, {:?}", c.overall);
    }

    #[test]
    fn runs_of_other_prompts_are_refused() {
        let a = run(|_| true);
        let mut b = a.clone();
        b.prompts.swap(0, 1);
        let e = compare(&a, &b, 1).unwrap_err().to_string();
        assert!(e.contains("paired comparison needs the same"), "{e}");
    }
}
