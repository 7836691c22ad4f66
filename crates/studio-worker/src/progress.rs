//! Carries progress from the training thread to the database: the observer sends over a
//! channel, and an async task writes metric rows in batches, milestone events and checkpoints.
//! Messages are handled in the order the trainer sent them, so a checkpoint is registered after
//! the metrics of its step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use studio_core::{CheckpointId, JobId};
use studio_store::keys::checkpoint_prefix;
use studio_store::{
    ArtifactStore, EventLevel, EventType, MetricPoint, NewCheckpoint, NewEvent, Store, StoreError,
};
use studio_store::RewardMetrics;
use studio_train::{CheckpointInfo, PreferenceMetrics, StepMetrics, StopRequest, TrainObserver};
use tokio::sync::mpsc;

use crate::retry::retry_unavailable;

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
    /// A user asked to pause the job: checkpoint, then stop until it is resumed.
    pub pause: AtomicBool,
    /// The worker is shutting down and hands the job back to the queue.
    pub shutdown: AtomicBool,
}

impl StopFlags {
    /// Returns the stop request for the trainer, if any. A cancelled or lost job needs no
    /// checkpoint. A paused or released one gets a checkpoint, so its next run loses no step.
    pub fn request(&self) -> Option<StopRequest> {
        if self.cancel.load(Ordering::Relaxed) || self.lost.load(Ordering::Relaxed) {
            Some(StopRequest::Abandon)
        } else if self.pause.load(Ordering::Relaxed) || self.shutdown.load(Ordering::Relaxed) {
            Some(StopRequest::Suspend)
        } else {
            None
        }
    }
}

pub enum Progress {
    Step(StepMetrics),
    /// A DPO step with its rewards.
    PreferenceStep(StepMetrics, PreferenceMetrics),
    Event(EventLevel, String),
    Checkpoint(CheckpointInfo),
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

    fn on_preference_step(&mut self, metrics: &StepMetrics, preference: &PreferenceMetrics) {
        let _ = self.sender.send(Progress::PreferenceStep(metrics.clone(), *preference));
    }

    fn on_event(&mut self, level: studio_train::EventLevel, message: &str) {
        let level = match level {
            studio_train::EventLevel::Info => EventLevel::Info,
            studio_train::EventLevel::Warn => EventLevel::Warn,
            studio_train::EventLevel::Error => EventLevel::Error,
        };
        let _ = self.sender.send(Progress::Event(level, message.to_owned()));
    }

    fn stop_request(&mut self) -> Option<StopRequest> {
        self.flags.request()
    }

    /// Hands the folder to the writer task, which uploads it, so training goes on meanwhile.
    fn on_checkpoint(&mut self, checkpoint: &CheckpointInfo) {
        let _ = self.sender.send(Progress::Checkpoint(checkpoint.clone()));
    }
}

/// The destinations of the writer task: the store, the artifact store and the job it writes for.
pub struct ProgressSink {
    pub store: Arc<dyn Store>,
    pub artifacts: Arc<ArtifactStore>,
    pub job_id: JobId,
    pub worker_id: String,
    pub flags: Arc<StopFlags>,
    /// How long to retry writes while the database is unavailable: the worker's lease.
    pub patience: Duration,
}

/// Writes progress until the observer is dropped; returns the last step seen.
pub async fn write_progress(
    sink: ProgressSink,
    mut receiver: mpsc::UnboundedReceiver<Progress>,
) -> Option<StepMetrics> {
    let mut writer = ProgressWriter {
        store: sink.store,
        artifacts: sink.artifacts,
        job_id: sink.job_id,
        worker_id: sink.worker_id,
        flags: sink.flags,
        patience: sink.patience,
        pending: Vec::new(),
        last: None,
    };
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    loop {
        tokio::select! {
            message = receiver.recv() => match message {
                Some(Progress::Step(metrics)) => writer.on_step(metrics, None).await,
                Some(Progress::PreferenceStep(metrics, preference)) => {
                    let rewards = RewardMetrics {
                        reward_chosen: preference.reward_chosen,
                        reward_rejected: preference.reward_rejected,
                        reward_accuracy: preference.reward_accuracy,
                        reward_margin: preference.reward_margin,
                    };
                    writer.on_step(metrics, Some(rewards)).await
                }
                Some(Progress::Event(level, message)) => writer.event(level, EventType::Message, message, None).await,
                Some(Progress::Checkpoint(checkpoint)) => writer.on_checkpoint(checkpoint).await,
                None => break,
            },
            _ = ticker.tick() => writer.flush(Retry::Later).await,
        }
    }
    writer.flush(Retry::Now).await;
    writer.last
}

struct ProgressWriter {
    store: Arc<dyn Store>,
    artifacts: Arc<ArtifactStore>,
    job_id: JobId,
    worker_id: String,
    flags: Arc<StopFlags>,
    patience: Duration,
    pending: Vec<MetricPoint>,
    last: Option<StepMetrics>,
}

/// The behaviour of a flush while the database is unavailable.
#[derive(Clone, Copy, PartialEq)]
enum Retry {
    /// Keep the rows for the next flush; training goes on meanwhile.
    Later,
    /// Retry with backoff, for rows that must be stored before what comes next.
    Now,
}

impl ProgressWriter {
    async fn on_step(&mut self, metrics: StepMetrics, rewards: Option<RewardMetrics>) {
        self.pending.push(MetricPoint {
            step: metrics.step,
            epoch: metrics.epoch,
            train_loss: metrics.train_loss,
            train_mean_token_accuracy: Some(metrics.train_mean_token_accuracy),
            valid_loss: metrics.valid_loss,
            valid_mean_token_accuracy: metrics.valid_mean_token_accuracy,
            learning_rate: metrics.learning_rate,
            grad_norm: metrics.grad_norm,
            tokens_per_second: metrics.tokens_per_second,
            trained_tokens: metrics.trained_tokens,
            rewards,
        });
        // Every evaluation gets an event, so the validation curve is visible in the events.
        if metrics.valid_loss.is_some() || is_progress_step(metrics.step, metrics.total_steps) {
            let mut message = step_message(&metrics);
            let mut data = metrics_event_data(&metrics);
            if let Some(rewards) = rewards {
                message.push_str(&format!(
                    ", reward accuracy={:.3}, reward margin={:.4}",
                    rewards.reward_accuracy, rewards.reward_margin
                ));
                data["reward_chosen"] = json!(rewards.reward_chosen);
                data["reward_rejected"] = json!(rewards.reward_rejected);
                data["reward_accuracy"] = json!(rewards.reward_accuracy);
                data["reward_margin"] = json!(rewards.reward_margin);
            }
            self.event(EventLevel::Info, EventType::Metrics, message, Some(data))
                .await;
        }
        self.last = Some(metrics);
        if self.pending.len() >= FLUSH_BATCH {
            self.flush(Retry::Later).await;
        }
    }

    async fn flush(&mut self, retry: Retry) {
        if self.pending.is_empty() || self.flags.lost.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let (store, job_id, worker_id, pending) =
            (&self.store, &self.job_id, self.worker_id.as_str(), &self.pending);
        let written = match retry {
            Retry::Later => store.insert_metrics(job_id, worker_id, pending).await,
            Retry::Now => {
                retry_unavailable("insert_metrics", self.patience, || {
                    store.insert_metrics(job_id, worker_id, pending)
                })
                .await
            }
        };
        match written {
            Ok(_) => self.pending.clear(),
            Err(StoreError::Conflict(message)) => {
                tracing::warn!(%message, "stopping the run: the job was taken from this worker");
                self.flags
                    .lost
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.pending.clear();
            }
            // The rows stay pending for the next flush. The outage itself is logged by the
            // heartbeat and by the retries of the next forced flush.
            Err(err @ StoreError::Unavailable(_)) => {
                tracing::debug!(error = %err, pending = self.pending.len(), "failed to write metrics; will retry")
            }
            Err(err) => {
                tracing::warn!(error = %err, pending = self.pending.len(), "failed to write metrics; will retry")
            }
        }
    }

    /// Uploads a checkpoint folder, registers it and removes the local copy. A failure is
    /// logged and the run goes on, because a missing checkpoint only costs a resume point.
    async fn on_checkpoint(&mut self, checkpoint: CheckpointInfo) {
        // A run resumed from this checkpoint does not repeat its steps, so their rows go first.
        self.flush(Retry::Now).await;
        if self.flags.lost.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let step = checkpoint.step;
        let prefix = checkpoint_prefix(&self.job_id, step);
        if let Err(err) = self.artifacts.put_dir(&prefix, &checkpoint.dir).await {
            tracing::warn!(step, error = %err, "failed to upload a checkpoint; the run goes on without it");
            return;
        }
        let row = NewCheckpoint {
            id: CheckpointId::new(),
            job_id: self.job_id.clone(),
            step,
            metrics: checkpoint_metrics(&checkpoint.metrics),
            artifact_key: prefix,
        };
        let registered = retry_unavailable("insert_checkpoint", self.patience, || {
            self.store.insert_checkpoint(&self.worker_id, &row)
        })
        .await;
        match registered {
            Ok(saved) => tracing::info!(step, checkpoint_id = %saved.id, "checkpoint stored"),
            Err(StoreError::Conflict(message)) => {
                tracing::warn!(%message, "stopping the run: the job was taken from this worker");
                self.flags
                    .lost
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(step, error = %err, "failed to register a checkpoint"),
        }
        // The trainer never reads a finished checkpoint again, so the local copy only takes space.
        if let Err(err) = tokio::fs::remove_dir_all(&checkpoint.dir).await {
            tracing::warn!(step, error = %err, "failed to remove an uploaded checkpoint folder");
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
        let written = retry_unavailable("insert_event", self.patience, || {
            self.store.insert_event(&event)
        })
        .await;
        if let Err(err) = written {
            tracing::warn!(error = %err, message = %event.message, "failed to write a job event");
        }
    }
}

fn step_message(metrics: &StepMetrics) -> String {
    let mut message = format!(
        "Step {}/{}: training loss={:.4}, learning rate={:.3e}",
        metrics.step, metrics.total_steps, metrics.train_loss, metrics.learning_rate
    );
    if let Some(valid_loss) = metrics.valid_loss {
        message.push_str(&format!(", validation loss={valid_loss:.4}"));
    }
    message
}

/// Builds the `data` of a `metrics` event: OpenAI's keys, then ours.
fn metrics_event_data(metrics: &StepMetrics) -> Value {
    json!({
        "step": metrics.step,
        "total_steps": metrics.total_steps,
        "train_loss": metrics.train_loss,
        "train_mean_token_accuracy": metrics.train_mean_token_accuracy,
        "valid_loss": metrics.valid_loss,
        "valid_mean_token_accuracy": metrics.valid_mean_token_accuracy,
        "epoch": metrics.epoch,
        "learning_rate": metrics.learning_rate,
        "grad_norm": metrics.grad_norm,
        "tokens_per_second": metrics.tokens_per_second,
    })
}

/// OpenAI's checkpoint `metrics`. The trainer evaluates the whole validation set, so the
/// `valid_*` and `full_valid_*` figures are the same numbers.
pub fn checkpoint_metrics(metrics: &StepMetrics) -> Value {
    json!({
        "step": metrics.step,
        "train_loss": metrics.train_loss,
        "train_mean_token_accuracy": metrics.train_mean_token_accuracy,
        "valid_loss": metrics.valid_loss,
        "valid_mean_token_accuracy": metrics.valid_mean_token_accuracy,
        "full_valid_loss": metrics.valid_loss,
        "full_valid_mean_token_accuracy": metrics.valid_mean_token_accuracy,
    })
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
