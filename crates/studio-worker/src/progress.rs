//! Carries progress from the training thread to the database: the observer sends over a
//! channel, and an async task writes metric rows in batches and milestone events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use studio_core::JobId;
use studio_store::{EventLevel, EventType, MetricPoint, NewEvent, Store, StoreError};
use studio_train::{StepMetrics, TrainObserver};
use tokio::sync::mpsc;

/// Metric rows are written at least this often while steps arrive.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// ...or as soon as this many are waiting.
const FLUSH_BATCH: usize = 64;
/// A run writes about this many progress events, whatever its length.
const PROGRESS_EVENTS_PER_RUN: u64 = 20;

/// Reasons to stop a run early, set by the heartbeat, the shutdown watcher and the writer and
/// read by the trainer between steps.
#[derive(Debug, Default)]
pub struct StopFlags {
    /// A user asked to cancel the job.
    pub cancel: AtomicBool,
    /// The worker no longer owns the job, so nothing it writes would count.
    pub lost: AtomicBool,
    /// The worker is shutting down and hands the job back to the queue.
    pub shutdown: AtomicBool,
}

impl StopFlags {
    pub fn any(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
            || self.lost.load(Ordering::Relaxed)
            || self.shutdown.load(Ordering::Relaxed)
    }
}

pub enum Progress {
    Step(StepMetrics),
    Event(EventLevel, String),
}

/// The observer handed to the trainer; every call only sends on a channel, so it is cheap.
pub struct ChannelObserver {
    pub sender: mpsc::UnboundedSender<Progress>,
    pub flags: Arc<StopFlags>,
}

impl TrainObserver for ChannelObserver {
    fn on_step(&mut self, metrics: &StepMetrics) {
        let _ = self.sender.send(Progress::Step(metrics.clone()));
    }

    fn on_event(&mut self, level: studio_train::EventLevel, message: &str) {
        let level = match level {
            studio_train::EventLevel::Info => EventLevel::Info,
            studio_train::EventLevel::Warn => EventLevel::Warn,
            studio_train::EventLevel::Error => EventLevel::Error,
        };
        let _ = self.sender.send(Progress::Event(level, message.to_owned()));
    }

    fn should_cancel(&mut self) -> bool {
        self.flags.any()
    }
}

/// Writes progress until the observer is dropped; returns the last step seen.
pub async fn write_progress(
    store: Arc<dyn Store>,
    job_id: JobId,
    worker_id: String,
    flags: Arc<StopFlags>,
    mut receiver: mpsc::UnboundedReceiver<Progress>,
) -> Option<StepMetrics> {
    let mut writer = ProgressWriter {
        store,
        job_id,
        worker_id,
        flags,
        pending: Vec::new(),
        last: None,
    };
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        tokio::select! {
            message = receiver.recv() => match message {
                Some(Progress::Step(metrics)) => writer.on_step(metrics).await,
                Some(Progress::Event(level, message)) => writer.event(level, EventType::Message, message, None).await,
                None => break,
            },
            _ = ticker.tick() => writer.flush().await,
        }
    }
    writer.flush().await;
    writer.last
}

struct ProgressWriter {
    store: Arc<dyn Store>,
    job_id: JobId,
    worker_id: String,
    flags: Arc<StopFlags>,
    pending: Vec<MetricPoint>,
    last: Option<StepMetrics>,
}

impl ProgressWriter {
    async fn on_step(&mut self, metrics: StepMetrics) {
        self.pending.push(MetricPoint {
            step: metrics.step,
            epoch: metrics.epoch,
            train_loss: metrics.train_loss,
            valid_loss: None,
            learning_rate: metrics.learning_rate,
            grad_norm: metrics.grad_norm,
            tokens_per_second: metrics.tokens_per_second,
            trained_tokens: metrics.trained_tokens,
        });
        if is_progress_step(metrics.step, metrics.total_steps) {
            let message = format!(
                "Step {}/{}: training loss={:.4}, learning rate={:.3e}",
                metrics.step, metrics.total_steps, metrics.train_loss, metrics.learning_rate
            );
            let data = json!({
                "step": metrics.step,
                "total_steps": metrics.total_steps,
                "epoch": metrics.epoch,
                "train_loss": metrics.train_loss,
                "learning_rate": metrics.learning_rate,
                "grad_norm": metrics.grad_norm,
                "tokens_per_second": metrics.tokens_per_second,
            });
            self.event(EventLevel::Info, EventType::Metrics, message, Some(data))
                .await;
        }
        self.last = Some(metrics);
        if self.pending.len() >= FLUSH_BATCH {
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        if self.pending.is_empty() || self.flags.lost.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        match self
            .store
            .insert_metrics(&self.job_id, &self.worker_id, &self.pending)
            .await
        {
            Ok(_) => self.pending.clear(),
            Err(StoreError::Conflict(message)) => {
                tracing::warn!(%message, "stopping the run: the job was taken from this worker");
                self.flags
                    .lost
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.pending.clear();
            }
            // The rows stay pending and are retried at the next flush.
            Err(err) => {
                tracing::warn!(error = %err, pending = self.pending.len(), "failed to write metrics; will retry")
            }
        }
    }

    async fn event(
        &self,
        level: EventLevel,
        event_type: EventType,
        message: String,
        data: Option<serde_json::Value>,
    ) {
        let event = NewEvent {
            job_id: self.job_id.clone(),
            level,
            event_type,
            message,
            data,
        };
        if let Err(err) = self.store.insert_event(&event).await {
            tracing::warn!(error = %err, message = %event.message, "failed to write a job event");
        }
    }
}

/// Selects the steps that get a progress event: the first, the last, and about
/// [`PROGRESS_EVENTS_PER_RUN`] evenly spaced ones between.
fn is_progress_step(step: u64, total_steps: u64) -> bool {
    let every = (total_steps / PROGRESS_EVENTS_PER_RUN).max(1);
    step == 1 || step == total_steps || step.checked_rem(every) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_steps_are_spread_over_the_run() {
        let steps: Vec<u64> = (1..=100).filter(|&s| is_progress_step(s, 100)).collect();
        assert_eq!(steps.len(), 21);
        assert_eq!(steps[0], 1);
        assert_eq!(*steps.last().unwrap(), 100);
    }

    #[test]
    fn short_run_reports_every_step() {
        assert!((1..=5).all(|s| is_progress_step(s, 5)));
    }
}
