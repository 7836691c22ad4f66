use std::time::Duration;

use async_trait::async_trait;
use studio_core::{CheckpointId, EventId, FileId, JobId};

use crate::records::{
    CancelOutcome, CheckpointRecord, EventRecord, FileRecord, Heartbeat, JobError, JobRecord,
    MetricPoint, NewCheckpoint, NewEvent, NewFile, NewJob, Page, PageRequest, PauseOutcome,
    RescuedJob,
};
use crate::event_bus::EventSubscription;
use crate::StoreError;

/// Persistence and the job queue. Backends (Postgres and SQLite) implement the same
/// contract; every method takes and returns domain types only.
///
/// Lists are newest first and paged with `after` (an id from the previous page) and `limit`.
/// Methods named for a worker change a job only while that worker still owns it: the job is
/// `running` and `locked_by` is `worker_id`. Otherwise they return [`StoreError::Conflict`].
#[async_trait]
pub trait Store: Send + Sync {
    async fn insert_file(&self, file: &NewFile) -> Result<FileRecord, StoreError>;
    async fn get_file(&self, id: &FileId) -> Result<FileRecord, StoreError>;
    async fn list_files(&self, page: &PageRequest) -> Result<Page<FileRecord>, StoreError>;

    /// Inserts a queued job. With an `idempotency_key` already stored, nothing is inserted:
    /// the job created with that key is returned (its id is not `job.id`) when its
    /// `request_hash` matches, and [`StoreError::Conflict`] otherwise. Concurrent inserts with
    /// one key store one job.
    async fn insert_job(&self, job: &NewJob) -> Result<JobRecord, StoreError>;
    async fn get_job(&self, id: &JobId) -> Result<JobRecord, StoreError>;
    async fn list_jobs(&self, page: &PageRequest) -> Result<Page<JobRecord>, StoreError>;
    /// Lists succeeded jobs, whose `fine_tuned_model`s can be served, newest first.
    async fn list_succeeded_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Cancels a job that has not started, or flags a running job so its worker stops it.
    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome, StoreError>;
    /// Pauses a job that has not started, or flags a running job so its worker writes a
    /// checkpoint and pauses it. A finished job, or a running one whose cancel was requested,
    /// is a [`StoreError::Conflict`] that names its state.
    async fn request_pause(&self, id: &JobId) -> Result<PauseOutcome, StoreError>;
    /// Puts a paused job back in the queue, claimable at once. Any other state is a
    /// [`StoreError::Conflict`] that names it.
    async fn resume_job(&self, id: &JobId) -> Result<JobRecord, StoreError>;

    /// Takes the oldest queued job whose `run_after` has passed for `worker_id` with a lease of
    /// `lease`, or `None` when there is none. Two concurrent claims never return the same job.
    async fn claim_job(
        &self,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError>;
    /// Extends the lease of a running job to now + `lease`, and reports cancel and pause
    /// requests.
    async fn heartbeat(
        &self,
        id: &JobId,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Heartbeat, StoreError>;
    async fn complete_job(
        &self,
        id: &JobId,
        worker_id: &str,
        fine_tuned_model: &str,
        trained_tokens: u64,
    ) -> Result<JobRecord, StoreError>;
    async fn fail_job(
        &self,
        id: &JobId,
        worker_id: &str,
        error: &JobError,
    ) -> Result<JobRecord, StoreError>;
    /// Sets `cancelled` after the worker stopped a run whose cancel was requested.
    async fn cancel_running_job(
        &self,
        id: &JobId,
        worker_id: &str,
    ) -> Result<JobRecord, StoreError>;
    /// Puts a running job back in the queue, for a worker that shuts down mid-run; the
    /// attempt does not count. A job whose cancel was requested becomes `cancelled` instead,
    /// and one whose pause was requested becomes `paused`.
    async fn release_job(&self, id: &JobId, worker_id: &str) -> Result<JobRecord, StoreError>;
    /// Sets `paused` after the worker checkpointed a run; the attempt does not count, and the
    /// job waits for [`Store::resume_job`]. A cancel requested after the worker's last
    /// heartbeat wins: the job becomes `cancelled`.
    async fn pause_running_job(&self, id: &JobId, worker_id: &str)
        -> Result<JobRecord, StoreError>;
    /// Ends the attempt of a worker that hit a transient failure, keeping `error` as the job's
    /// `last_error`: the job goes back to the queue after [`crate::retry_delay`], or fails when
    /// this was its last attempt (then `error` names the attempts and keeps `error`'s code).
    /// A requested cancel or pause cancels or pauses the job instead.
    async fn requeue_job(
        &self,
        id: &JobId,
        worker_id: &str,
        error: &JobError,
    ) -> Result<JobRecord, StoreError>;
    /// Ends the attempts of running jobs whose lease expired, as [`Store::requeue_job`] does
    /// with a `worker_lost` error: each is requeued after a backoff, failed when out of
    /// attempts, cancelled when its cancel was requested, or paused when its pause was.
    async fn rescue_expired_jobs(&self) -> Result<Vec<RescuedJob>, StoreError>;

    async fn insert_event(&self, event: &NewEvent) -> Result<EventRecord, StoreError>;
    async fn list_events(
        &self,
        job_id: &JobId,
        page: &PageRequest,
    ) -> Result<Page<EventRecord>, StoreError>;
    /// Lists at most `limit` events of `job_id` inserted after the event `after` (from the
    /// first when `None`), oldest first. An `after` that is not an event of this job is
    /// [`StoreError::NotFound`]. Each job's events become visible in insertion order, so a
    /// reader that passes the last event it read never skips one.
    async fn list_events_since(
        &self,
        job_id: &JobId,
        after: Option<&EventId>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError>;
    /// Subscribes to wake-ups sent after each `insert_event` commits. Once this returns, every
    /// later insert wakes the subscription: on Postgres through `LISTEN`/`NOTIFY`, so inserts by
    /// other processes count too, and on SQLite only inserts through this store instance.
    async fn subscribe_events(&self) -> Result<EventSubscription, StoreError>;

    /// Writes metric rows of a job the worker owns; a step written before is overwritten, so
    /// a resumed run may repeat steps. Returns the number of rows written.
    async fn insert_metrics(
        &self,
        job_id: &JobId,
        worker_id: &str,
        points: &[MetricPoint],
    ) -> Result<u64, StoreError>;
    /// Lists all metric rows of a job, by step.
    async fn list_metrics(&self, job_id: &JobId) -> Result<Vec<MetricPoint>, StoreError>;

    /// Registers a checkpoint of a job the worker owns. A checkpoint of the same step written
    /// by an earlier attempt is replaced, keeping its id.
    async fn insert_checkpoint(
        &self,
        worker_id: &str,
        checkpoint: &NewCheckpoint,
    ) -> Result<CheckpointRecord, StoreError>;
    /// Lists a job's checkpoints, latest step first; `after` is a checkpoint id.
    async fn list_checkpoints(
        &self,
        job_id: &JobId,
        page: &PageRequest,
    ) -> Result<Page<CheckpointRecord>, StoreError>;
    /// Returns the checkpoint `id` of `job_id`; a checkpoint of another job is not found.
    async fn get_checkpoint(
        &self,
        job_id: &JobId,
        id: &CheckpointId,
    ) -> Result<CheckpointRecord, StoreError>;
}
