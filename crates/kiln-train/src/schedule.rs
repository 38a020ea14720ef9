//! Learning-rate schedules, a pure function of the optimizer step (1-based), so resuming needs no
//! scheduler state beyond the step counter.

use kiln_recipe::{Schedule, TrainSection};

#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    kind: Schedule,
    peak: f64,
    floor: f64,
    warmup: usize,
    total: usize,
}

impl LrSchedule {
    pub fn new(train: &TrainSection, total_steps: usize) -> Self {
        Self { kind: train.schedule, peak: train.lr, floor: train.min_lr, warmup: train.warmup_steps, total: total_steps.max(1) }
    }

    /// Learning rate of optimizer step `step` (1-based).
    pub fn at(&self, step: usize) -> f64 {
        let s = step.max(1) as f64;
        let w = self.warmup as f64;
        if self.warmup > 0 && step <= self.warmup {
            return self.peak * s / w;
        }
        match self.kind {
            Schedule::Constant => self.peak,
            // fairseq's inverse_sqrt: continuous at the end of warmup.
            Schedule::InverseSqrt => self.peak * (w.max(1.0) / s).sqrt(),
            Schedule::Cosine => {
                let span = (self.total.saturating_sub(self.warmup)).max(1) as f64;
                let progress = ((s - w) / span).clamp(0.0, 1.0);
                self.floor + 0.5 * (self.peak - self.floor) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(kind: Schedule) -> TrainSection {
        TrainSection { schedule: kind, lr: 1e-3, warmup_steps: 100, min_lr: 1e-5, ..Default::default() }
    }

    #[test]
    fn warmup_then_inverse_sqrt() {
        let s = LrSchedule::new(&train(Schedule::InverseSqrt), 1000);
        assert!((s.at(1) - 1e-5).abs() < 1e-12);
        assert!((s.at(100) - 1e-3).abs() < 1e-12);
        assert!((s.at(400) - 5e-4).abs() < 1e-12);
    }

    #[test]
    fn cosine_reaches_floor() {
        let s = LrSchedule::new(&train(Schedule::Cosine), 1100);
        assert!((s.at(100) - 1e-3).abs() < 1e-12);
        assert!((s.at(600) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-9);
        assert!((s.at(1100) - 1e-5).abs() < 1e-12);
        assert!(s.at(300) > s.at(700));
    }

    #[test]
    fn constant_after_warmup() {
        let s = LrSchedule::new(&train(Schedule::Constant), 10);
        assert_eq!(s.at(5000), 1e-3);
    }
}
