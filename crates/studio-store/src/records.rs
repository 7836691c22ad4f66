//! The rows the store reads and writes, as domain types (no SQL types leak out).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use studio_core::dataset::DatasetFormat;
use studio_core::{CheckpointId, EventId, FileId, JobId, JobSpec, JobStatus};

/// A file to register after its content is stored and validated.
#[derive(Clone, Debug, PartialEq)]
pub struct NewFile {
    pub id: FileId,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub format: DatasetFormat,
    pub line_count: u64,
    /// The client's `Idempotency-Key`. A second insert with the key returns the first file when
    /// its `sha256`, `filename` and `purpose` match, and fails with a conflict otherwise.
    pub idempotency_key: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FileRecord {
    pub id: FileId,
    pub created_at: DateTime<Utc>,
    pub filename: String,
    pub purpose: String,
    pub bytes: u64,
    pub sha256: String,
    pub format: DatasetFormat,
    pub line_count: u64,
    pub status: String,
}

/// A job to insert; it starts `queued`.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    pub id: JobId,
    pub spec: JobSpec,
    /// How often the job may be claimed before an expired lease fails it.
    pub max_attempts: u32,
    /// The client's `Idempotency-Key`: at most one job is stored per key.
    pub idempotency_key: Option<String>,
    /// A hash of the canonical create request, set exactly when `idempotency_key` is, so the
    /// store detects a repeat of the key with another request.
    pub request_hash: Option<String>,
}

/// The `error` object of a failed job, as OpenAI shapes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: JobId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: JobStatus,
    pub spec: JobSpec,
    pub error: Option<JobError>,
    pub fine_tuned_model: Option<String>,
    pub trained_tokens: Option<u64>,
    /// The worker that owns the job while it runs.
    pub locked_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// How many times the job was claimed, this run included.
    pub attempt: u32,
    pub max_attempts: u32,
    pub cancel_requested: bool,
    /// Set on a running job whose pause was requested, until its worker pauses it.
    pub pause_requested: bool,
    /// A queued job is not claimed before this time: the backoff after a failed attempt.
    pub run_after: Option<DateTime<Utc>>,
    /// The error of the latest attempt that ended without finishing the job, from a lost
    /// worker or a transient failure. The job may have been requeued since.
    pub last_error: Option<JobError>,
    pub idempotency_key: Option<String>,
}

/// The effect of a cancel request.
#[derive(Clone, Debug, PartialEq)]
pub enum CancelOutcome {
    /// The job had not started and is now `cancelled`.
    Cancelled(JobRecord),
    /// The job is running; its worker will stop it and set `cancelled`.
    Requested(JobRecord),
    /// The job had already finished; nothing changed.
    AlreadyFinished(JobRecord),
}

/// The effect of a pause request.
#[derive(Clone, Debug, PartialEq)]
pub enum PauseOutcome {
    /// The job had not started and is now `paused`.
    Paused(JobRecord),
    /// The job is running; its worker will write a checkpoint and set `paused`.
    Requested(JobRecord),
    /// The job was already paused; nothing changed.
    AlreadyPaused(JobRecord),
}

/// The result of a heartbeat from the worker that owns the job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heartbeat {
    pub cancel_requested: bool,
    /// The worker should write a checkpoint and call `pause_running_job`.
    pub pause_requested: bool,
    pub lease_expires_at: DateTime<Utc>,
}

/// The new state of a job whose lease expired.
#[derive(Clone, Debug, PartialEq)]
pub struct RescuedJob {
    pub id: JobId,
    pub status: JobStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventLevel {
    Info,
    Warn,
    Error,
}

impl EventLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            EventLevel::Info => "info",
            EventLevel::Warn => "warn",
            EventLevel::Error => "error",
        }
    }
}

/// OpenAI's event `type`: a plain message, or a metrics line whose `data` has the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Message,
    Metrics,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Message => "message",
            EventType::Metrics => "metrics",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub job_id: JobId,
    pub level: EventLevel,
    pub event_type: EventType,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

impl NewEvent {
    pub fn message(job_id: &JobId, level: EventLevel, message: impl Into<String>) -> Self {
        Self {
            job_id: job_id.clone(),
            level,
            event_type: EventType::Message,
            message: message.into(),
            data: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventRecord {
    pub id: EventId,
    pub job_id: JobId,
    pub created_at: DateTime<Utc>,
    pub level: EventLevel,
    pub event_type: EventType,
    pub message: String,
    pub data: Option<serde_json::Value>,
}

/// The figures of one optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// 1-based.
    pub step: u64,
    pub epoch: f64,
    pub train_loss: f64,
    /// Share of target tokens predicted by argmax; `None` in rows written before it was recorded.
    pub train_mean_token_accuracy: Option<f64>,
    /// `None` at steps without an evaluation.
    pub valid_loss: Option<f64>,
    pub valid_mean_token_accuracy: Option<f64>,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    /// Tokens trained so far, padding excluded.
    pub trained_tokens: u64,
    /// DPO rewards of the step, `None` for other methods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<RewardMetrics>,
}

/// Means over a DPO step's pairs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardMetrics {
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// Share of pairs whose chosen reward is above the rejected one.
    pub reward_accuracy: f64,
    pub reward_margin: f64,
}

/// A checkpoint folder uploaded under `artifact_key`, to register.
#[derive(Clone, Debug, PartialEq)]
pub struct NewCheckpoint {
    pub id: CheckpointId,
    pub job_id: JobId,
    /// The optimizer step after which it was written, 1-based.
    pub step: u64,
    /// OpenAI's checkpoint `metrics` object.
    pub metrics: serde_json::Value,
    /// The artifact prefix of the folder, such as `jobs/{job_id}/checkpoints/step-{n}`.
    pub artifact_key: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointRecord {
    pub id: CheckpointId,
    pub job_id: JobId,
    pub created_at: DateTime<Utc>,
    pub step: u64,
    pub metrics: serde_json::Value,
    pub artifact_key: String,
}

/// An `after`/`limit` page request, as OpenAI's list endpoints take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// The id of the last item of the previous page.
    pub after: Option<String>,
    pub limit: u32,
}

impl PageRequest {
    pub fn first(limit: u32) -> Self {
        Self { after: None, limit }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

/// Rebuilds a step's rewards from their four columns; a row without all four has none.
pub(crate) fn rewards_from_columns(
    chosen: Option<f64>,
    rejected: Option<f64>,
    accuracy: Option<f64>,
    margin: Option<f64>,
) -> Option<RewardMetrics> {
    Some(RewardMetrics {
        reward_chosen: chosen?,
        reward_rejected: rejected?,
        reward_accuracy: accuracy?,
        reward_margin: margin?,
    })
}
