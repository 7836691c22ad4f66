//! The progress of a local run: a bar on a terminal, one line per step elsewhere, and every
//! step in `metrics.csv`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use studio_train::{CheckpointInfo, EventLevel, PreferenceMetrics, StepMetrics, StopRequest, TrainObserver};

/// The columns of `metrics.csv`. The reward columns are filled by DPO steps and empty for the
/// other methods.
const CSV_HEADER: &str = "step,epoch,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy,learning_rate,grad_norm,tokens_per_second,reward_chosen,reward_rejected,reward_accuracy,reward_margin";

/// A progress bar with step, loss, tokens/s and time left, and every step in `metrics.csv`.
pub(super) struct ProgressObserver {
    bar: ProgressBar,
    csv: fs::File,
}

impl ProgressObserver {
    /// Creates `OUTPUT/metrics.csv` with its header and starts the bar.
    pub(super) fn new(output: &Path) -> anyhow::Result<Self> {
        let path = output.join("metrics.csv");
        let mut csv = fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        writeln!(csv, "{CSV_HEADER}")?;
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  elapsed {elapsed}  left {eta}")
                .expect("valid progress template"),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        Ok(Self { bar, csv })
    }

    /// Removes the bar, so the lines printed after the run stand alone.
    pub(super) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Prints above the bar, or plainly when the bar is hidden because output is not a terminal.
    fn print(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Shows a step on the bar or its own line and appends it to `metrics.csv`.
    fn record(&mut self, m: &StepMetrics, preference: Option<&PreferenceMetrics>) {
        self.bar.set_length(m.total_steps);
        self.bar.set_position(m.step);
        let rewards = preference
            .map(|p| format!("  margin {:.4}  reward accuracy {:.2}", p.reward_margin, p.reward_accuracy))
            .unwrap_or_default();
        let valid = m.valid_loss.map(|v| format!("  valid {v:.4}")).unwrap_or_default();
        let message = format!("loss {:.4}{rewards}{valid}  {:.0} tokens/s", m.train_loss, m.tokens_per_second);
        if self.bar.is_hidden() {
            // Not a terminal (a log file or CI): one line per step instead of a bar.
            println!("step {}/{}  {message}", m.step, m.total_steps);
        }
        self.bar.set_message(message);

        let optional = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let reward = |pick: fn(&PreferenceMetrics) -> f64| optional(preference.map(pick));
        let _ = writeln!(
            self.csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            m.step,
            m.epoch,
            m.train_loss,
            m.train_mean_token_accuracy,
            optional(m.valid_loss),
            optional(m.valid_mean_token_accuracy),
            m.learning_rate,
            m.grad_norm,
            m.tokens_per_second,
            reward(|p| p.reward_chosen),
            reward(|p| p.reward_rejected),
            reward(|p| p.reward_accuracy),
            reward(|p| p.reward_margin),
        );
    }
}

impl TrainObserver for ProgressObserver {
    fn on_step(&mut self, metrics: &StepMetrics) {
        self.record(metrics, None);
    }

    fn on_preference_step(&mut self, metrics: &StepMetrics, preference: &PreferenceMetrics) {
        self.record(metrics, Some(preference));
    }

    fn on_event(&mut self, level: EventLevel, message: &str) {
        let prefix = match level {
            EventLevel::Info => "",
            EventLevel::Warn => "warning: ",
            EventLevel::Error => "error: ",
        };
        self.print(format!("{prefix}{message}"));
    }

    fn stop_request(&mut self) -> Option<StopRequest> {
        None
    }

    fn on_checkpoint(&mut self, checkpoint: &CheckpointInfo) {
        self.print(format!("checkpoint at step {}: {}", checkpoint.step, checkpoint.dir.display()));
    }
}
