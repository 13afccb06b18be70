//! Reward hacking, noticed: the training reward against a gold score that is not trained on
//! (a held-out benchmark). When the training reward keeps rising while the gold score falls over
//! `patience` evaluations, the run is optimising the reward, not what it stands for.

/// One evaluation: the training reward and the gold score at that point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub epoch: usize,
    pub reward: f64,
    pub gold: f64,
}

/// Watches evaluations for a rising reward with a falling gold score, and remembers the best gold.
#[derive(Debug, Clone, PartialEq)]
pub struct HackMonitor {
    pub patience: usize,
    history: Vec<Evaluation>,
}

/// What the monitor says after an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing to say.
    Fine,
    /// This evaluation has the best gold score so far (keep its checkpoint).
    Best,
    /// Over the last `patience` evaluations the reward rose and the gold score fell.
    Hacking { since_epoch: usize, reward_gain: f64, gold_loss: f64 },
}

impl HackMonitor {
    pub fn new(patience: usize) -> Self {
        Self { patience: patience.max(1), history: Vec::new() }
    }

    /// The evaluation with the best gold score so far.
    pub fn best(&self) -> Option<&Evaluation> {
        self.history.iter().max_by(|a, b| a.gold.total_cmp(&b.gold))
    }

    /// Records an evaluation and judges the run.
    pub fn observe(&mut self, e: Evaluation) -> Verdict {
        let best_before = self.best().map(|b| b.gold);
        self.history.push(e);
        if self.history.len() > self.patience {
            let window = &self.history[self.history.len() - 1 - self.patience..];
            let rising = window.windows(2).all(|w| w[1].reward >= w[0].reward) && window[self.patience].reward > window[0].reward;
            let falling = window.windows(2).all(|w| w[1].gold <= w[0].gold) && window[self.patience].gold < window[0].gold;
            if rising && falling {
                let (first, last) = (window[0], window[self.patience]);
                return Verdict::Hacking { since_epoch: first.epoch, reward_gain: last.reward - first.reward, gold_loss: first.gold - last.gold };
            }
        }
        if best_before.is_none_or(|b| e.gold > b) {
            Verdict::Best
        } else {
            Verdict::Fine
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(series: &[(f64, f64)], patience: usize) -> Vec<Verdict> {
        let mut m = HackMonitor::new(patience);
        series.iter().enumerate().map(|(i, &(reward, gold))| m.observe(Evaluation { epoch: 5 * i, reward, gold })).collect()
    }

    #[test]
    fn a_rising_reward_with_a_falling_gold_score_is_hacking() {
        let v = run(&[(1.0, 0.5), (1.2, 0.6), (1.4, 0.55), (1.6, 0.5), (1.8, 0.4)], 3);
        assert_eq!(v[..3], [Verdict::Best, Verdict::Best, Verdict::Fine]);
        assert_eq!(v[3], Verdict::Fine, "a fall over two evaluations is within patience 3");
        match &v[4] {
            Verdict::Hacking { since_epoch, reward_gain, gold_loss } => {
                assert_eq!(*since_epoch, 5);
                assert!((reward_gain - 0.6).abs() < 1e-12 && (gold_loss - 0.2).abs() < 1e-12);
            }
            other => panic!("expected hacking, got {other:?}"),
        }
    }

    #[test]
    fn rising_together_or_noisy_gold_is_not_hacking() {
        let together = run(&[(1.0, 0.5), (1.2, 0.6), (1.4, 0.7), (1.6, 0.8)], 2);
        assert!(together.iter().all(|v| *v == Verdict::Best), "{together:?}");
        let noisy = run(&[(1.0, 0.5), (1.2, 0.4), (1.4, 0.45), (1.6, 0.3)], 2);
        assert!(!noisy[..3].iter().any(|v| matches!(v, Verdict::Hacking { .. })), "{noisy:?}");
        let falling_reward = run(&[(1.0, 0.5), (0.9, 0.4), (0.8, 0.3)], 2);
        assert!(!falling_reward.iter().any(|v| matches!(v, Verdict::Hacking { .. })), "{falling_reward:?}");
    }
}
