//! Learning-rate schedules: linear warmup, then cosine, linear or constant decay.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecayKind {
    /// Half a cosine wave from the peak down to zero, as `transformers`' `cosine` schedule.
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: DecayKind,
}

impl Schedule {
    /// Returns the learning rate of 1-based optimizer step `step`, with `transformers`' conventions:
    /// warmup rises linearly over `step / warmup_steps` and the decay reaches zero just after
    /// the last step.
    pub fn learning_rate(&self, step: u64) -> f64 {
        let index = step.saturating_sub(1);
        if index < self.warmup_steps {
            return self.peak_lr * index as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = (index - self.warmup_steps) as f64 / decay_steps as f64;
        match self.decay {
            DecayKind::Constant => self.peak_lr,
            DecayKind::Linear => self.peak_lr * (1.0 - progress).max(0.0),
            DecayKind::Cosine => self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: DecayKind) -> Schedule {
        Schedule {
            peak_lr: 1e-3,
            warmup_steps: 4,
            total_steps: 12,
            decay,
        }
    }

    #[test]
    fn warmup_rises_linearly_from_zero() {
        let s = schedule(DecayKind::Cosine);
        let rates: Vec<f64> = (1..=5).map(|step| s.learning_rate(step)).collect();
        assert_eq!(rates, vec![0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]);
    }

    #[test]
    fn cosine_halves_at_midpoint_of_decay() {
        let s = schedule(DecayKind::Cosine);
        // Decay spans steps 5..=12 (indices 4..12); index 8 is halfway.
        assert!((s.learning_rate(9) - 5e-4).abs() < 1e-12);
        assert!(s.learning_rate(12) > 0.0);
        assert!(s.learning_rate(12) < s.learning_rate(11));
    }

    #[test]
    fn linear_and_constant_decay() {
        let linear = schedule(DecayKind::Linear);
        assert!((linear.learning_rate(9) - 5e-4).abs() < 1e-12);
        assert!((linear.learning_rate(12) - 1.25e-4).abs() < 1e-12);
        let constant = schedule(DecayKind::Constant);
        assert_eq!(constant.learning_rate(12), 1e-3);
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let s = Schedule { warmup_steps: 0, ..schedule(DecayKind::Cosine) };
        assert_eq!(s.learning_rate(1), 1e-3);
    }
}
