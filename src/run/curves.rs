//! `reward.png` of a run: the training reward per epoch and, when the run evaluates a gold
//! score, a second panel with the held-out evaluations beside it, so a reward that rises while
//! the gold score falls is seen at a glance. Read from the `metrics.jsonl` records.

use image::{Rgb, RgbImage};

use crate::render::plot::{line_plot, stack, Series};

/// The gold fields drawn, with their legend names and colours.
const GOLD: &[(&str, &str, [u8; 3])] = &[
    ("eval/suite_strict", "suite strict (held-out)", [202, 75, 42]),
    ("eval/suite_partial", "suite partial", [245, 160, 60]),
    ("eval/diversity", "diversity", [60, 150, 80]),
    ("eval/out_of_range", "out of range", [120, 120, 120]),
];

/// The per-epoch series of a run's records (NaN where an epoch has no value).
#[derive(Debug, Default, Clone)]
pub struct RunCurves {
    pub reward_mean: Vec<f64>,
    pub reward_std: Vec<f64>,
    /// One series per [`GOLD`] field.
    gold: Vec<Vec<f64>>,
    /// The gold reward script's mean (`eval/reward`), on a scale of its own.
    gold_reward: Vec<f64>,
}

impl RunCurves {
    /// Adds one epoch's `metrics.jsonl` record.
    pub fn push(&mut self, record: &serde_json::Value) {
        let value = |k: &str| record[k].as_f64().unwrap_or(f64::NAN);
        self.reward_mean.push(value("reward_mean"));
        self.reward_std.push(value("reward_std"));
        self.gold.resize(GOLD.len(), Vec::new());
        for (series, (field, _, _)) in self.gold.iter_mut().zip(GOLD) {
            series.push(value(field));
        }
        self.gold_reward.push(value("eval/reward"));
    }

    /// Whether any epoch has a gold evaluation.
    fn has_gold(&self) -> bool {
        self.gold.iter().flatten().any(|v| v.is_finite())
    }

    /// The plot: the reward panel, and the gold panel under it when there are evaluations.
    pub fn draw(&self) -> RgbImage {
        let reward = crate::render::reward_curve(&self.reward_mean, &self.reward_std, 480, 260, "training reward per epoch");
        if !self.has_gold() {
            return reward;
        }
        let series: Vec<Series> = GOLD
            .iter()
            .zip(&self.gold)
            .filter(|(_, values)| values.iter().any(|v| v.is_finite()))
            .map(|((_, name, colour), values)| Series { name, values, band: None, colour: Rgb(*colour) })
            .collect();
        let gold = line_plot(&series, "gold evaluation: not the training reward (dots: evaluations)", "epoch", "score (0..1)", 480, 260);
        if !self.gold_reward.iter().any(|v| v.is_finite()) {
            return stack(&[reward, gold]);
        }
        let script = Series { name: "gold reward script, mean over held-out samples", values: &self.gold_reward, band: None, colour: Rgb([128, 60, 160]) };
        stack(&[reward, line_plot(&[script], "gold reward (--eval-reward)", "epoch", "gold reward", 480, 260), gold])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gold_panel_appears_with_the_first_evaluation() {
        let mut c = RunCurves::default();
        c.push(&serde_json::json!({"reward_mean": 1.0, "reward_std": 0.1}));
        c.push(&serde_json::json!({"reward_mean": 1.5, "reward_std": 0.1}));
        assert_eq!(c.draw().height(), 260, "no evaluation yet: the reward panel alone");
        c.push(&serde_json::json!({"reward_mean": 2.0, "reward_std": 0.1, "eval/suite_strict": 0.4, "eval/out_of_range": 0.01}));
        let img = c.draw();
        assert_eq!(img.height(), 520, "reward and gold panels");
        // The gold panel draws the strict score's colour somewhere.
        let strict = Rgb(GOLD[0].2);
        assert!((260..520).any(|y| (0..480).any(|x| *img.get_pixel(x, y) == strict)));
    }
}
