//! An experiment's table (`results.md`) and curves (`results.png`), read from its finished run
//! folders alone: each row is a group of runs that differ only by seed, with the mean ± sample
//! standard deviation over its seeds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use super::{Experiment, RunResult, RunState, RESULT_FILE};
use crate::render::plot::{line_plot, stack, Series};
use crate::script::experiment::RunSpec;

const PALETTE: [[u8; 3]; 8] = [[33, 113, 181], [202, 75, 42], [60, 150, 80], [128, 60, 160], [245, 160, 60], [20, 160, 170], [200, 60, 130], [110, 110, 110]];

/// A finished run's records and result.
struct Finished {
    spec: RunSpec,
    records: Vec<serde_json::Value>,
    result: RunResult,
    /// The gold score before the first update (runs made before it was kept have none).
    base_gold: Option<f64>,
}

impl Finished {
    fn metric(&self, at: usize, key: &str) -> Option<f64> {
        self.records.get(at).and_then(|r| r[key].as_f64())
    }

    fn last(&self, key: &str) -> Option<f64> {
        self.records.iter().rev().find_map(|r| r[key].as_f64())
    }

    /// Seconds spent sampling, scoring and training, summed over epochs.
    fn seconds(&self) -> f64 {
        self.records.iter().map(|r| ["seconds_sampling", "seconds_reward", "seconds_training"].iter().filter_map(|k| r[*k].as_f64()).sum::<f64>()).sum()
    }

}

/// The runs of one row: the same options but the seed.
struct Group<'a> {
    runs: Vec<&'a Finished>,
    total: usize,
}

/// mean ± sample standard deviation, or "–" without values.
fn mean_std(values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    if values.is_empty() {
        return "–".into();
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() == 1 {
        return fmt(mean);
    }
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    format!("{} ± {}", fmt(mean), fmt(std).trim_start_matches('+'))
}

/// The table and the curves of an experiment.
pub struct Report {
    pub markdown: String,
    pub plot: RgbImage,
}

impl Report {
    /// Writes `results.md` and `results.png` into the experiment's folder; returns their paths.
    pub fn write(&self, exp: &Experiment) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(&exp.dir)?;
        let (md, png) = (exp.dir.join("results.md"), exp.dir.join("results.png"));
        crate::io::write_atomic(&md, self.markdown.as_bytes())?;
        crate::render::save_png(&self.plot, &png)?;
        Ok((md, png))
    }
}

/// Reads every finished run of `exp` and builds its report.
pub fn report(exp: &Experiment) -> anyhow::Result<Report> {
    let specs = exp.spec.runs();
    let mut finished = Vec::new();
    for spec in &specs {
        if exp.state(spec) != RunState::Finished {
            continue;
        }
        let dir = exp.run_dir(spec);
        let text = std::fs::read_to_string(dir.join(RESULT_FILE))?;
        let result: RunResult = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}/{RESULT_FILE} is corrupt: {e}", dir.display()))?;
        let base_gold = std::fs::read_to_string(dir.join(crate::session::GOLD_BASE_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| v["eval/gold"].as_f64());
        finished.push(Finished { spec: spec.clone(), records: crate::run::read_records(&dir), result, base_gold });
    }
    let mut groups: Vec<(String, Group)> = Vec::new();
    for spec in &specs {
        if !groups.iter().any(|(g, _)| *g == spec.group) {
            let runs = finished.iter().filter(|f| f.spec.group == spec.group).collect();
            let total = specs.iter().filter(|s| s.group == spec.group).count();
            groups.push((spec.group.clone(), Group { runs, total }));
        }
    }
    Ok(Report { markdown: markdown(exp, &groups, finished.len(), specs.len()), plot: plot(exp, &groups) })
}

/// A path under the working folder written relative to it, so that the table does not carry this
/// machine's folder names; anything else as it is.
fn relative_to_cwd(value: &str) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    match Path::new(value).strip_prefix(&cwd) {
        Ok(rel) if Path::new(value).is_absolute() => rel.display().to_string(),
        _ => value.to_string(),
    }
}

fn markdown(exp: &Experiment, groups: &[(String, Group)], done: usize, total: usize) -> String {
    let spec = &exp.spec;
    let axes: Vec<&str> = spec.axes.iter().map(|a| a.name.as_str()).collect();
    let mut out = format!("# Experiment `{}`\n\n", spec.name);
    let shared: Vec<String> = spec.shared.iter().map(|(o, v)| format!("`--{o} {}`", relative_to_cwd(&v.to_string()))).collect();
    let seeds: Vec<String> = spec.seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(out, "From `{}`. Shared options: {}. Seeds: {}. Finished runs: {done} of {total}.\n", spec.file.display(), if shared.is_empty() { "none".into() } else { shared.join(" ") }, seeds.join(", "));
    let _ = writeln!(out, "Mean ± sample standard deviation over the finished seeds of each row. *final reward*: the last epoch's mean training reward; *change*: from epoch 0 to the last; *paired change*: the finetuned model minus the base model on the same prompts and noise, by the training reward; *gold*: the last gold evaluation (`--eval-every`), and the same evaluation of the model before training; *out of range*: the last epoch's final samples outside [-1, 1].\n");
    let header: Vec<String> = axes.iter().map(|a| a.to_string()).chain(["seeds", "final reward", "change", "paired change", "gold", "gold before", "out of range"].map(String::from)).collect();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", header.iter().enumerate().map(|(i, _)| if i < axes.len() { "---|" } else { "---:|" }).collect::<String>());
    let signed = |v: f64| format!("{v:+.4}");
    for (_, g) in groups {
        let Some(first) = g.runs.first() else { continue };
        let collect = |f: &dyn Fn(&Finished) -> Option<f64>| g.runs.iter().filter_map(|r| f(r)).collect::<Vec<f64>>();
        let last_epoch = |r: &Finished| r.records.len().checked_sub(1);
        let cells = [
            format!("{}/{}", g.runs.len(), g.total),
            mean_std(&collect(&|r| last_epoch(r).and_then(|e| r.metric(e, "reward_mean"))), signed),
            mean_std(&collect(&|r| Some(r.metric(last_epoch(r)?, "reward_mean")? - r.metric(0, "reward_mean")?)), signed),
            mean_std(&collect(&|r| r.result.paired.map(|p| p.change())), signed),
            mean_std(&collect(&|r| r.last("eval/gold")), |v| format!("{v:.3}")),
            mean_std(&collect(&|r| r.base_gold), |v| format!("{v:.3}")),
            mean_std(&collect(&|r| last_epoch(r).and_then(|e| r.metric(e, "out_of_range")).filter(|v| v.is_finite())), |v| format!("{:.1}%", 100.0 * v)),
        ];
        let row: Vec<String> = axes.iter().map(|a| format!("`{}`", first.spec.label(a))).chain(cells).collect();
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    let _ = writeln!(out, "\nWall time (sampling, rewards and training summed over epochs; this machine's, so not part of the comparison):\n");
    for (name, g) in groups.iter().filter(|(_, g)| !g.runs.is_empty()) {
        let minutes: f64 = g.runs.iter().map(|r| r.seconds()).sum::<f64>() / 60.0;
        let _ = writeln!(out, "- `{name}`: {minutes:.1} min over {} run(s)", g.runs.len());
    }
    out
}

/// The axis whose values get a panel each: `reward` or `task`, where the experiment has one.
fn panel_axis(exp: &Experiment) -> Option<&crate::script::experiment::Axis> {
    exp.spec.axes.iter().find(|a| a.name == "reward" || a.name == "task")
}

/// One panel per value of the panel axis (one panel without it), one line per row, the band
/// over seeds.
fn plot(exp: &Experiment, groups: &[(String, Group)]) -> RgbImage {
    let axis = panel_axis(exp);
    let panel_values: Vec<String> = axis.map_or(vec![String::new()], |a| a.values.iter().map(|v| v.label.clone()).collect());
    let axis_name = axis.map_or("", |a| a.name.as_str());
    let panels: Vec<RgbImage> = panel_values
        .iter()
        .map(|value| {
            let members: Vec<&Group> = groups.iter().map(|(_, g)| g).filter(|g| !g.runs.is_empty() && (value.is_empty() || g.runs[0].spec.label(axis_name) == value)).collect();
            let curves: Vec<(String, Vec<f64>, Vec<f64>)> = members.iter().map(|g| curve(g, axis_name)).collect();
            let series: Vec<Series> = curves
                .iter()
                .enumerate()
                .map(|(i, (name, mean, std))| Series { name, values: mean, band: Some(std), colour: Rgb(PALETTE[i % PALETTE.len()]) })
                .collect();
            let title = if value.is_empty() {
                format!("{}: mean training reward per epoch (band: std over seeds)", exp.spec.name)
            } else {
                format!("{axis_name} {value}: mean training reward per epoch (band: std over seeds)")
            };
            line_plot(&series, &title, "epoch", "reward", 560, 300)
        })
        .collect();
    stack(&panels)
}

/// A row's legend name (its labels but the panel axis's) and its per-epoch mean and std over
/// seeds.
fn curve(g: &Group, panel_axis: &str) -> (String, Vec<f64>, Vec<f64>) {
    let spec = &g.runs[0].spec;
    let name: Vec<String> = spec.labels.iter().filter(|(a, _)| a != panel_axis).map(|(a, l)| format!("{a} {l}")).collect();
    let epochs = g.runs.iter().map(|r| r.records.len()).max().unwrap_or(0);
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    for e in 0..epochs {
        let v: Vec<f64> = g.runs.iter().filter_map(|r| r.metric(e, "reward_mean")).collect();
        let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
        mean.push(if v.is_empty() { f64::NAN } else { m });
        std.push(if v.len() < 2 { 0.0 } else { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt() });
    }
    (if name.is_empty() { "all".into() } else { name.join(" ") }, mean, std)
}
