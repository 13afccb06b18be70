//! Progress of a step-based training run (pretraining the diffusion model or the small CLIP):
//! a bar with the smoothed loss on a terminal, and a plain line every 25 steps otherwise (logs of
//! background runs), plus checkpoint lines with the elapsed time.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// Steps between plain progress lines when stderr is not a terminal.
const LINE_EVERY: usize = 25;

pub struct StepProgress {
    pub bar: ProgressBar,
    start: Instant,
    first_step: usize,
    smoothed_loss: Option<f64>,
}

impl StepProgress {
    /// A bar for a run of `total` steps that starts (or resumes) at `step`.
    pub fn new(total: usize, step: usize) -> Self {
        let bar = ProgressBar::new(total as u64).with_position(step as u64);
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {per_sec} eta {eta} {msg}").expect("valid template"));
        Self { bar, start: Instant::now(), first_step: step, smoothed_loss: None }
    }

    /// Records finished step `step` with its `loss`; `extra` (e.g. `lr 1.0e-3 |g| 0.2`) follows
    /// the smoothed loss.
    pub fn step(&mut self, step: usize, loss: f64, extra: &str) {
        // An exponential average: one batch's loss is too noisy to read.
        let l = self.smoothed_loss.map_or(loss, |m| 0.98 * m + 0.02 * loss);
        self.smoothed_loss = Some(l);
        self.bar.set_position(step as u64);
        self.bar.set_message(format!("loss {l:.4} {extra}"));
        if self.bar.is_hidden() && step % LINE_EVERY == 0 {
            let rate = (step - self.first_step) as f64 / self.start.elapsed().as_secs_f64();
            eprintln!("step {step}: loss {l:.4} {extra} ({rate:.2} steps/s)");
        }
    }

    pub fn checkpoint(&self, step: usize, dir: &Path) {
        let loss = self.smoothed_loss.unwrap_or(f64::NAN);
        let line = format!("step {step}: loss {loss:.4}, checkpoint in {} ({:.0} s)", dir.display(), self.start.elapsed().as_secs_f64());
        super::say(&self.bar, line);
    }
}
