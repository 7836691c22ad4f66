//! The SQLite backend of [`Store`]: one database file, for a single machine with nothing installed.
//!
//! SQLite has no row locks, so there is no `SKIP LOCKED`: one writer at a time holds the
//! database's write lock, and every state change below is a single statement, or a transaction
//! begun with `BEGIN IMMEDIATE`, so it reads and changes the rows with no other writer in between.
//! Timestamps are INTEGER microseconds since the Unix epoch from the injected [`Clock`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::Row;
use studio_core::dataset::DatasetFormat;
use studio_core::{CheckpointId, EventId, FileId, JobId, JobSpec, JobStatus};

use crate::attempts::{end_attempt, worker_lost, AttemptOutcome, EndingAttempt};
use crate::records::{
    CancelOutcome, CheckpointRecord, EventLevel, EventRecord, EventType, FileRecord, Heartbeat,
    JobError, JobRecord, MetricPoint, NewCheckpoint, NewEvent, NewFile, NewJob, Page, PageRequest,
    PauseOutcome, RescuedJob,
};
use crate::rows::{
    corrupt, file_idempotency_mismatch, idempotency_mismatch, into_page, job_id, not_pausable, not_resumable,
    same_upload, status, to_i64, to_u64,
};
use crate::event_bus::{EventBus, EventNotice, EventSubscription};
use crate::{Clock, Store, StoreError};

/// How long a statement waits for another connection's write lock before it fails with
/// "database is locked". Every write here is short, so a wait this long means a stuck writer.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns the database file of a `sqlite://PATH` or `sqlite:PATH` URL, or `None` for another
/// scheme. The rest of the URL is the path as written: `sqlite:///var/studio.db` is absolute and
/// `sqlite://studio-data/studio.db` is relative to the working folder. Query parameters are not
/// read, because the store sets every connection option itself.
pub fn sqlite_path(database_url: &str) -> Option<Result<PathBuf, StoreError>> {
    let path = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))?;
    if path.is_empty() || path.starts_with(":memory:") {
        return Some(Err(StoreError::Conflict(format!(
            "unsupported SQLite URL {database_url:?}: name a database file, such as sqlite://studio-data/studio.db"
        ))));
    }
    Some(Ok(PathBuf::from(path)))
}

/// Opens a pool on the database file `path`, creating the file and its folder when missing.
/// Connections use WAL mode, in which readers do not wait for the writer, and they enforce
/// foreign keys.
pub(crate) async fn connect(path: &Path) -> Result<SqlitePool, StoreError> {
    if let Some(folder) = path.parent().filter(|folder| !folder.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(folder).await?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    Ok(pool)
}

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    clock: Arc<dyn Clock>,
    /// Wakes event readers of this process, such as the API of `smart-studio up`.
    // NOTE: SQLite has no cross-process notifications, so an insert by a worker in another
    // process wakes no reader here. Readers also re-read on a timer to see those events.
    events: EventBus,
}

impl SqliteStore {
    /// Wraps a pool whose connections enforce foreign keys; [`SqliteStore::open`] makes one.
    pub fn new(pool: SqlitePool, clock: Arc<dyn Clock>) -> Self {
        Self {
            pool,
            clock,
            events: EventBus::new(),
        }
    }

    /// Opens (and creates when missing) the database file `path` without migrating it.
    pub async fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Ok(Self::new(connect(path).await?, clock))
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn now(&self) -> i64 {
        self.clock.now().timestamp_micros()
    }

    fn lease_end(&self, lease: Duration) -> Result<i64, StoreError> {
        let lease = TimeDelta::from_std(lease)
            .map_err(|_| StoreError::Conflict(format!("lease of {lease:?} is too long")))?;
        Ok((self.clock.now() + lease).timestamp_micros())
    }

    /// Looks up the paging position of `after` in `table`, or `i64::MAX` for the first page.
    async fn seq_after(
        &self,
        table: &'static str,
        entity: &'static str,
        after: Option<&str>,
    ) -> Result<i64, StoreError> {
        let Some(after) = after else {
            return Ok(i64::MAX);
        };
        let sql = format!("SELECT seq FROM {table} WHERE id = ?1");
        let seq: Option<i64> = sqlx::query_scalar(&sql)
            .bind(after)
            .fetch_optional(&self.pool)
            .await?;
        seq.ok_or_else(|| StoreError::not_found(entity, after))
    }

    /// Returns the job a worker-side update returned, or explains why it changed nothing.
    async fn owned_update(
        &self,
        id: &JobId,
        worker_id: &str,
        row: Option<SqliteRow>,
    ) -> Result<JobRecord, StoreError> {
        match row {
            Some(row) => job_from_row(&row),
            None => Err(self.not_owned(id, worker_id).await),
        }
    }

    /// Builds the error for a worker that no longer owns job `id`, naming its current state.
    async fn not_owned(&self, id: &JobId, worker_id: &str) -> StoreError {
        match self.get_job(id).await {
            Ok(job) => StoreError::Conflict(format!(
                "job {id} is no longer owned by worker {worker_id}: it is {} and locked by {}",
                job.status,
                job.locked_by.as_deref().unwrap_or("nobody")
            )),
            Err(err) => err,
        }
    }
}

const FILE_COLUMNS: &str =
    "id, created_at, filename, purpose, bytes, sha256, format, line_count, status";

const JOB_COLUMNS: &str = "id, created_at, updated_at, started_at, finished_at, status, spec, error, \
     fine_tuned_model, trained_tokens, locked_by, lease_expires_at, attempt, max_attempts, cancel_requested, \
     pause_requested, run_after, last_error, idempotency_key";

/// The columns of a running job that decide where it goes when its attempt ends.
const ENDING_ATTEMPT_COLUMNS: &str =
    "id, locked_by, lease_expires_at, attempt, max_attempts, cancel_requested, pause_requested";

const EVENT_COLUMNS: &str = "id, job_id, created_at, level, type, message, data";

const CHECKPOINT_COLUMNS: &str = "id, job_id, created_at, step, metrics, artifact_key";

/// The ownership guard of every worker-side change, with the job id as `?1` and the worker as `?2`.
const OWNED_BY_WORKER: &str = "id = ?1 AND locked_by = ?2 AND status = 'running'";

#[async_trait]
impl Store for SqliteStore {
    async fn insert_file(&self, file: &NewFile) -> Result<FileRecord, StoreError> {
        let sql = format!(
            "INSERT INTO files (id, created_at, filename, purpose, bytes, sha256, format, line_count, idempotency_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING {FILE_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(file.id.as_str())
            .bind(self.now())
            .bind(&file.filename)
            .bind(&file.purpose)
            .bind(to_i64(file.bytes))
            .bind(&file.sha256)
            .bind(file.format.as_str())
            .bind(to_i64(file.line_count))
            .bind(file.idempotency_key.as_deref())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return file_from_row(&row);
        }
        // Only a stored idempotency key makes the insert do nothing.
        let key = file.idempotency_key.as_deref().unwrap_or_default();
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE idempotency_key = ?1");
        let existing = file_from_row(&sqlx::query(&sql).bind(key).fetch_one(&self.pool).await?)?;
        if !same_upload(&existing, file) {
            return Err(file_idempotency_mismatch(key, &existing.id));
        }
        Ok(existing)
    }

    async fn get_file(&self, id: &FileId) -> Result<FileRecord, StoreError> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| file_from_row(&row))
            .unwrap_or_else(|| Err(StoreError::not_found("file", id.as_str())))
    }

    async fn list_files(&self, page: &PageRequest) -> Result<Page<FileRecord>, StoreError> {
        let before = self
            .seq_after("files", "file", page.after.as_deref())
            .await?;
        let sql =
            format!("SELECT {FILE_COLUMNS} FROM files WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2");
        let rows = sqlx::query(&sql)
            .bind(before)
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        into_page(rows, page.limit, file_from_row)
    }

    async fn insert_job(&self, job: &NewJob) -> Result<JobRecord, StoreError> {
        let spec = &job.spec;
        // Safe under concurrency: the insert and the unique index check run under the write
        // lock, so of two inserts with one key the second finds the first's row and does nothing.
        let sql = format!(
            "INSERT INTO jobs (id, created_at, updated_at, status, model, training_file, validation_file, suffix,
                               seed, metadata, spec, hyperparameters, max_attempts, idempotency_key, request_hash)
             VALUES (?1, ?2, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(job.id.as_str())
            .bind(self.now())
            .bind(&spec.model)
            .bind(spec.training_file.as_str())
            .bind(spec.validation_file.as_ref().map(|id| id.as_str()))
            .bind(spec.suffix.as_deref())
            .bind(to_i64(spec.seed))
            .bind(spec.metadata.as_ref().map(Json))
            .bind(Json(spec))
            .bind(Json(spec.hyperparameters()))
            .bind(i64::from(job.max_attempts))
            .bind(job.idempotency_key.as_deref())
            .bind(job.request_hash.as_deref())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return job_from_row(&row);
        }
        // Only a stored idempotency key makes the insert do nothing.
        let key = job.idempotency_key.as_deref().unwrap_or_default();
        let sql = format!("SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = ?1");
        let row = sqlx::query(&sql).bind(key).fetch_one(&self.pool).await?;
        let stored_hash: Option<String> = row.try_get("request_hash")?;
        let existing = job_from_row(&row)?;
        if stored_hash != job.request_hash {
            return Err(idempotency_mismatch(key, &existing.id));
        }
        Ok(existing)
    }

    async fn get_job(&self, id: &JobId) -> Result<JobRecord, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| job_from_row(&row))
            .unwrap_or_else(|| Err(StoreError::not_found("fine-tuning job", id.as_str())))
    }

    async fn list_jobs(&self, page: &PageRequest) -> Result<Page<JobRecord>, StoreError> {
        let before = self
            .seq_after("jobs", "fine-tuning job", page.after.as_deref())
            .await?;
        let sql =
            format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2");
        let rows = sqlx::query(&sql)
            .bind(before)
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        into_page(rows, page.limit, job_from_row)
    }

    async fn list_succeeded_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let sql =
            format!("SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'succeeded' ORDER BY seq DESC");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn request_cancel(&self, id: &JobId) -> Result<CancelOutcome, StoreError> {
        // Safe under concurrency: one statement under the write lock, so a claim commits wholly
        // before or after it. The SET expressions read the old row, so `status` and
        // `finished_at` follow the same branch.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
                 finished_at = CASE WHEN status = 'running' THEN finished_at ELSE ?2 END,
                 cancel_requested = 1,
                 run_after = NULL,
                 updated_at = ?2
             WHERE id = ?1 AND status IN ('validating_files', 'queued', 'paused', 'running')
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => {
                let job = job_from_row(&row)?;
                Ok(if job.status == JobStatus::Running {
                    CancelOutcome::Requested(job)
                } else {
                    CancelOutcome::Cancelled(job)
                })
            }
            None => Ok(CancelOutcome::AlreadyFinished(self.get_job(id).await?)),
        }
    }

    async fn request_pause(&self, id: &JobId) -> Result<PauseOutcome, StoreError> {
        // Safe under concurrency: one statement under the write lock, like request_cancel. The
        // SET expressions read the old row, so `status` and `pause_requested` agree.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN status = 'running' THEN status ELSE 'paused' END,
                 pause_requested = (status = 'running'),
                 run_after = NULL,
                 updated_at = ?2
             WHERE id = ?1
               AND (status IN ('validating_files', 'queued')
                    OR (status = 'running' AND NOT cancel_requested))
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            let job = self.get_job(id).await?;
            return match job.status {
                JobStatus::Paused => Ok(PauseOutcome::AlreadyPaused(job)),
                _ => Err(not_pausable(&job)),
            };
        };
        let job = job_from_row(&row)?;
        Ok(if job.status == JobStatus::Running {
            PauseOutcome::Requested(job)
        } else {
            PauseOutcome::Paused(job)
        })
    }

    async fn resume_job(&self, id: &JobId) -> Result<JobRecord, StoreError> {
        let sql = format!(
            "UPDATE jobs SET status = 'queued', run_after = NULL, updated_at = ?2
             WHERE id = ?1 AND status = 'paused'
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => job_from_row(&row),
            None => Err(not_resumable(&self.get_job(id).await?)),
        }
    }

    async fn claim_job(
        &self,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Option<JobRecord>, StoreError> {
        // Safe under concurrency: BEGIN IMMEDIATE takes the write lock before the statement
        // reads, so claimers run one after another and each reads the previous claim committed.
        let sql = format!(
            "UPDATE jobs SET
                 status = 'running',
                 locked_by = ?1,
                 lease_expires_at = ?2,
                 run_after = NULL,
                 attempt = attempt + 1,
                 started_at = COALESCE(started_at, ?3),
                 updated_at = ?3
             WHERE seq = (
                 SELECT seq FROM jobs
                 WHERE status = 'queued' AND attempt < max_attempts
                   AND (run_after IS NULL OR run_after <= ?3)
                 ORDER BY seq
                 LIMIT 1
             )
             RETURNING {JOB_COLUMNS}"
        );
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(&sql)
            .bind(worker_id)
            .bind(self.lease_end(lease)?)
            .bind(self.now())
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.map(|row| job_from_row(&row)).transpose()
    }

    async fn heartbeat(
        &self,
        id: &JobId,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Heartbeat, StoreError> {
        // Safe under concurrency: the guard and the write are one statement under the write
        // lock, so a lease is extended only while this worker still owns the running job.
        let sql = format!(
            "UPDATE jobs SET lease_expires_at = ?3, updated_at = ?4
             WHERE {OWNED_BY_WORKER}
             RETURNING cancel_requested, pause_requested, lease_expires_at"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.lease_end(lease)?)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok(Heartbeat {
                cancel_requested: row.try_get("cancel_requested")?,
                pause_requested: row.try_get("pause_requested")?,
                lease_expires_at: timestamp(row.try_get("lease_expires_at")?)?,
            }),
            None => Err(self.not_owned(id, worker_id).await),
        }
    }

    async fn complete_job(
        &self,
        id: &JobId,
        worker_id: &str,
        fine_tuned_model: &str,
        trained_tokens: u64,
    ) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: the guard is checked in the same statement under the write
        // lock, so a worker whose job was rescued and claimed again cannot finish the new run.
        let sql = format!(
            "UPDATE jobs SET status = 'succeeded', finished_at = ?3, updated_at = ?3,
                 fine_tuned_model = ?4, trained_tokens = ?5, locked_by = NULL, lease_expires_at = NULL
             WHERE {OWNED_BY_WORKER}
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.now())
            .bind(fine_tuned_model)
            .bind(to_i64(trained_tokens))
            .fetch_optional(&self.pool)
            .await?;
        self.owned_update(id, worker_id, row).await
    }

    async fn fail_job(
        &self,
        id: &JobId,
        worker_id: &str,
        error: &JobError,
    ) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: the same one-statement ownership guard as complete_job.
        let sql = format!(
            "UPDATE jobs SET status = 'failed', finished_at = ?3, updated_at = ?3, error = ?4,
                 locked_by = NULL, lease_expires_at = NULL
             WHERE {OWNED_BY_WORKER}
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.now())
            .bind(Json(error))
            .fetch_optional(&self.pool)
            .await?;
        self.owned_update(id, worker_id, row).await
    }

    async fn cancel_running_job(
        &self,
        id: &JobId,
        worker_id: &str,
    ) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: the same one-statement ownership guard as complete_job.
        let sql = format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?3, updated_at = ?3,
                 locked_by = NULL, lease_expires_at = NULL
             WHERE {OWNED_BY_WORKER}
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        self.owned_update(id, worker_id, row).await
    }

    async fn release_job(&self, id: &JobId, worker_id: &str) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: the same one-statement ownership guard as complete_job; the
        // job becomes claimable only once this statement commits.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN cancel_requested THEN 'cancelled'
                               WHEN pause_requested THEN 'paused' ELSE 'queued' END,
                 finished_at = CASE WHEN cancel_requested THEN ?3 ELSE finished_at END,
                 updated_at = ?3, attempt = attempt - 1, pause_requested = 0,
                 locked_by = NULL, lease_expires_at = NULL
             WHERE {OWNED_BY_WORKER}
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        self.owned_update(id, worker_id, row).await
    }

    async fn pause_running_job(
        &self,
        id: &JobId,
        worker_id: &str,
    ) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: the same one-statement ownership guard as complete_job.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'paused' END,
                 finished_at = CASE WHEN cancel_requested THEN ?3 ELSE finished_at END,
                 updated_at = ?3, attempt = attempt - 1,
                 pause_requested = 0, locked_by = NULL, lease_expires_at = NULL
             WHERE {OWNED_BY_WORKER}
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.now())
            .fetch_optional(&self.pool)
            .await?;
        self.owned_update(id, worker_id, row).await
    }

    async fn requeue_job(
        &self,
        id: &JobId,
        worker_id: &str,
        error: &JobError,
    ) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: BEGIN IMMEDIATE holds the write lock from the read to the
        // commit, so no rescue, cancel or pause request changes the job in between.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let sql = format!("SELECT {ENDING_ATTEMPT_COLUMNS} FROM jobs WHERE {OWNED_BY_WORKER}");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Err(self.not_owned(id, worker_id).await);
        };
        let now = self.clock.now();
        let outcome = end_attempt(&ending_attempt_from_row(&row)?, error.clone(), now);
        let job = apply_attempt_outcome(&mut tx, id, &outcome, now).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn rescue_expired_jobs(&self) -> Result<Vec<RescuedJob>, StoreError> {
        // Safe under concurrency: BEGIN IMMEDIATE holds the write lock from the read to the
        // commit, so a heartbeat commits wholly before it (and its lease is seen) or after it
        // (and finds the job not owned).
        let now = self.clock.now();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let sql = format!(
            "SELECT {ENDING_ATTEMPT_COLUMNS} FROM jobs
             WHERE status = 'running' AND lease_expires_at < ?1
             ORDER BY seq"
        );
        let rows = sqlx::query(&sql)
            .bind(now.timestamp_micros())
            .fetch_all(&mut *tx)
            .await?;
        let mut rescued = Vec::with_capacity(rows.len());
        for row in &rows {
            let attempt = ending_attempt_from_row(row)?;
            let worker: String = row.try_get("locked_by")?;
            let expired_at = timestamp(row.try_get("lease_expires_at")?)?;
            let outcome = end_attempt(&attempt, worker_lost(&worker, expired_at), now);
            apply_attempt_outcome(&mut tx, &attempt.id, &outcome, now).await?;
            rescued.push(RescuedJob {
                id: attempt.id,
                status: outcome.status,
            });
        }
        tx.commit().await?;
        Ok(rescued)
    }

    async fn insert_event(&self, event: &NewEvent) -> Result<EventRecord, StoreError> {
        let sql = format!(
            "INSERT INTO job_events (id, job_id, created_at, level, type, message, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             RETURNING {EVENT_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(EventId::new().as_str())
            .bind(event.job_id.as_str())
            .bind(self.now())
            .bind(event.level.as_str())
            .bind(event.event_type.as_str())
            .bind(&event.message)
            .bind(event.data.as_ref().map(Json))
            .fetch_one(&self.pool)
            .await?;
        // The statement has committed, so a woken reader finds the row.
        self.events.publish(EventNotice::Inserted(event.job_id.clone()));
        event_from_row(&row)
    }

    async fn list_events(
        &self,
        job_id: &JobId,
        page: &PageRequest,
    ) -> Result<Page<EventRecord>, StoreError> {
        // An event of another job is not found, like an unknown one: its position would page
        // this job's events from an unrelated point.
        let before = match page.after.as_deref() {
            None => i64::MAX,
            Some(after) => {
                let seq: Option<i64> =
                    sqlx::query_scalar("SELECT seq FROM job_events WHERE id = ?1 AND job_id = ?2")
                        .bind(after)
                        .bind(job_id.as_str())
                        .fetch_optional(&self.pool)
                        .await?;
                seq.ok_or_else(|| {
                    StoreError::not_found("event", format!("{after} of fine-tuning job {job_id}"))
                })?
            }
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(job_id.as_str())
            .bind(before)
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        into_page(rows, page.limit, event_from_row)
    }

    async fn list_events_since(
        &self,
        job_id: &JobId,
        after: Option<&EventId>,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        // Each insert draws its `seq` and commits under the database's one write lock, so a
        // job's events become visible in `seq` order.
        let rows = match after {
            None => {
                let sql = format!(
                    "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ?1 ORDER BY seq LIMIT ?2"
                );
                sqlx::query(&sql)
                    .bind(job_id.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(after) => {
                // An unknown `after` makes the subquery NULL and the result empty, so only an
                // empty result needs the lookup below to tell the two apart.
                let sql = format!(
                    "SELECT {EVENT_COLUMNS} FROM job_events
                     WHERE job_id = ?1
                       AND seq > (SELECT seq FROM job_events WHERE id = ?2 AND job_id = ?1)
                     ORDER BY seq LIMIT ?3"
                );
                let rows = sqlx::query(&sql)
                    .bind(job_id.as_str())
                    .bind(after.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                if rows.is_empty() {
                    let known: Option<i64> = sqlx::query_scalar(
                        "SELECT seq FROM job_events WHERE id = ?1 AND job_id = ?2",
                    )
                    .bind(after.as_str())
                    .bind(job_id.as_str())
                    .fetch_optional(&self.pool)
                    .await?;
                    if known.is_none() {
                        return Err(StoreError::not_found(
                            "event",
                            format!("{after} of fine-tuning job {job_id}"),
                        ));
                    }
                }
                rows
            }
        };
        rows.iter().map(event_from_row).collect()
    }

    async fn subscribe_events(&self) -> Result<EventSubscription, StoreError> {
        Ok(self.events.subscribe())
    }

    async fn insert_metrics(
        &self,
        job_id: &JobId,
        worker_id: &str,
        points: &[MetricPoint],
    ) -> Result<u64, StoreError> {
        if points.is_empty() {
            return Ok(0);
        }
        // Safe under concurrency: BEGIN IMMEDIATE holds the write lock from the ownership check
        // to the commit, so no rescue or claim can take the job between them.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let owned: Option<i64> =
            sqlx::query_scalar(&format!("SELECT 1 FROM jobs WHERE {OWNED_BY_WORKER}"))
                .bind(job_id.as_str())
                .bind(worker_id)
                .fetch_optional(&mut *tx)
                .await?;
        if owned.is_none() {
            tx.rollback().await?;
            return Err(self.not_owned(job_id, worker_id).await);
        }

        let created_at = self.now();
        let mut written = 0;
        for point in points {
            // NOTE: SQLite stores a NaN bound to a REAL column as NULL, so a NaN loss or
            // grad_norm fails the NOT NULL check here, where Postgres would store it.
            let result = sqlx::query(
                "INSERT INTO job_metrics (job_id, step, created_at, epoch, train_loss, valid_loss, learning_rate,
                                          grad_norm, tokens_per_second, trained_tokens,
                                          train_mean_token_accuracy, valid_mean_token_accuracy,
                                          reward_chosen, reward_rejected, reward_accuracy, reward_margin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (job_id, step) DO UPDATE SET
                     created_at = excluded.created_at, epoch = excluded.epoch,
                     train_loss = excluded.train_loss, valid_loss = excluded.valid_loss,
                     learning_rate = excluded.learning_rate, grad_norm = excluded.grad_norm,
                     tokens_per_second = excluded.tokens_per_second,
                     trained_tokens = excluded.trained_tokens,
                     train_mean_token_accuracy = excluded.train_mean_token_accuracy,
                     valid_mean_token_accuracy = excluded.valid_mean_token_accuracy,
                     reward_chosen = excluded.reward_chosen, reward_rejected = excluded.reward_rejected,
                     reward_accuracy = excluded.reward_accuracy, reward_margin = excluded.reward_margin",
            )
            .bind(job_id.as_str())
            .bind(to_i64(point.step))
            .bind(created_at)
            .bind(point.epoch)
            .bind(point.train_loss)
            .bind(point.valid_loss)
            .bind(point.learning_rate)
            .bind(point.grad_norm)
            .bind(point.tokens_per_second)
            .bind(to_i64(point.trained_tokens))
            .bind(point.train_mean_token_accuracy)
            .bind(point.valid_mean_token_accuracy)
            .bind(point.rewards.map(|r| r.reward_chosen))
            .bind(point.rewards.map(|r| r.reward_rejected))
            .bind(point.rewards.map(|r| r.reward_accuracy))
            .bind(point.rewards.map(|r| r.reward_margin))
            .execute(&mut *tx)
            .await?;
            written += result.rows_affected();
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn list_metrics(&self, job_id: &JobId) -> Result<Vec<MetricPoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT step, epoch, train_loss, valid_loss, learning_rate, grad_norm, tokens_per_second, trained_tokens,
                    train_mean_token_accuracy, valid_mean_token_accuracy,
                    reward_chosen, reward_rejected, reward_accuracy, reward_margin
             FROM job_metrics WHERE job_id = ?1 ORDER BY step",
        )
        .bind(job_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(metric_from_row).collect()
    }

    async fn insert_checkpoint(
        &self,
        worker_id: &str,
        checkpoint: &NewCheckpoint,
    ) -> Result<CheckpointRecord, StoreError> {
        // Safe under concurrency: the ownership guard is checked in the same statement under
        // the write lock, like complete_job.
        let sql = format!(
            "INSERT INTO checkpoints (id, job_id, step, created_at, metrics, artifact_key)
             SELECT ?3, ?1, ?4, ?5, ?6, ?7
             WHERE EXISTS (SELECT 1 FROM jobs WHERE {OWNED_BY_WORKER})
             ON CONFLICT (job_id, step) DO UPDATE SET
                 created_at = excluded.created_at, metrics = excluded.metrics,
                 artifact_key = excluded.artifact_key
             RETURNING {CHECKPOINT_COLUMNS}"
        );
        let job_id = &checkpoint.job_id;
        let row = sqlx::query(&sql)
            .bind(job_id.as_str())
            .bind(worker_id)
            .bind(checkpoint.id.as_str())
            .bind(to_i64(checkpoint.step))
            .bind(self.now())
            .bind(Json(&checkpoint.metrics))
            .bind(&checkpoint.artifact_key)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => checkpoint_from_row(&row),
            None => Err(self.not_owned(job_id, worker_id).await),
        }
    }

    async fn list_checkpoints(
        &self,
        job_id: &JobId,
        page: &PageRequest,
    ) -> Result<Page<CheckpointRecord>, StoreError> {
        let before = match page.after.as_deref() {
            None => i64::MAX,
            Some(after) => {
                let id = CheckpointId::parse(after)
                    .map_err(|_| StoreError::not_found("checkpoint", after))?;
                to_i64(self.get_checkpoint(job_id, &id).await?.step)
            }
        };
        let sql = format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = ?1 AND step < ?2
             ORDER BY step DESC LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(job_id.as_str())
            .bind(before)
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        into_page(rows, page.limit, checkpoint_from_row)
    }

    async fn get_checkpoint(
        &self,
        job_id: &JobId,
        id: &CheckpointId,
    ) -> Result<CheckpointRecord, StoreError> {
        let sql =
            format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = ?1 AND job_id = ?2");
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(job_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| checkpoint_from_row(&row)).unwrap_or_else(|| {
            Err(StoreError::not_found(
                "checkpoint",
                format!("{id} of fine-tuning job {job_id}"),
            ))
        })
    }
}

/// Writes the new state of a running job whose attempt ended, in the transaction that read it.
async fn apply_attempt_outcome(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: &JobId,
    outcome: &AttemptOutcome,
    now: DateTime<Utc>,
) -> Result<JobRecord, StoreError> {
    let sql = format!(
        "UPDATE jobs SET status = ?2, finished_at = ?3, error = COALESCE(?4, error), last_error = ?5,
             run_after = ?6, pause_requested = 0, locked_by = NULL, lease_expires_at = NULL,
             updated_at = ?7
         WHERE id = ?1 AND status = 'running'
         RETURNING {JOB_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id.as_str())
        .bind(outcome.status.as_str())
        .bind(outcome.finished_at.map(|t| t.timestamp_micros()))
        .bind(outcome.error.as_ref().map(Json))
        .bind(Json(&outcome.last_error))
        .bind(outcome.run_after.map(|t| t.timestamp_micros()))
        .bind(now.timestamp_micros())
        .fetch_one(&mut **tx)
        .await?;
    job_from_row(&row)
}

fn ending_attempt_from_row(row: &SqliteRow) -> Result<EndingAttempt, StoreError> {
    let attempt: i64 = row.try_get("attempt")?;
    let max_attempts: i64 = row.try_get("max_attempts")?;
    Ok(EndingAttempt {
        id: job_id(row.try_get("id")?)?,
        attempt: u32::try_from(attempt).unwrap_or(0),
        max_attempts: u32::try_from(max_attempts).unwrap_or(0),
        cancel_requested: row.try_get("cancel_requested")?,
        pause_requested: row.try_get("pause_requested")?,
    })
}

/// Decodes a column of microseconds since the Unix epoch.
fn timestamp(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(micros).ok_or_else(|| {
        StoreError::other(
            "cannot decode stored timestamp",
            format!("{micros} microseconds since the Unix epoch is out of range"),
        )
    })
}

fn optional_timestamp(micros: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    micros.map(timestamp).transpose()
}

fn file_from_row(row: &SqliteRow) -> Result<FileRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let format: String = row.try_get("format")?;
    Ok(FileRecord {
        id: FileId::parse(&id).map_err(|err| corrupt("file id", err))?,
        created_at: timestamp(row.try_get("created_at")?)?,
        filename: row.try_get("filename")?,
        purpose: row.try_get("purpose")?,
        bytes: to_u64(row.try_get("bytes")?),
        sha256: row.try_get("sha256")?,
        format: DatasetFormat::from_name(&format).ok_or_else(|| {
            StoreError::Conflict(format!("stored file {id} has unknown format {format:?}"))
        })?,
        line_count: to_u64(row.try_get("line_count")?),
        status: row.try_get("status")?,
    })
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord, StoreError> {
    let Json(spec): Json<JobSpec> = row.try_get("spec")?;
    let error: Option<Json<JobError>> = row.try_get("error")?;
    let last_error: Option<Json<JobError>> = row.try_get("last_error")?;
    let trained_tokens: Option<i64> = row.try_get("trained_tokens")?;
    let attempt: i64 = row.try_get("attempt")?;
    let max_attempts: i64 = row.try_get("max_attempts")?;
    Ok(JobRecord {
        id: job_id(row.try_get("id")?)?,
        created_at: timestamp(row.try_get("created_at")?)?,
        updated_at: timestamp(row.try_get("updated_at")?)?,
        started_at: optional_timestamp(row.try_get("started_at")?)?,
        finished_at: optional_timestamp(row.try_get("finished_at")?)?,
        status: status(row.try_get("status")?)?,
        spec,
        error: error.map(|Json(error)| error),
        fine_tuned_model: row.try_get("fine_tuned_model")?,
        trained_tokens: trained_tokens.map(to_u64),
        locked_by: row.try_get("locked_by")?,
        lease_expires_at: optional_timestamp(row.try_get("lease_expires_at")?)?,
        attempt: u32::try_from(attempt).unwrap_or(0),
        max_attempts: u32::try_from(max_attempts).unwrap_or(0),
        cancel_requested: row.try_get("cancel_requested")?,
        pause_requested: row.try_get("pause_requested")?,
        run_after: optional_timestamp(row.try_get("run_after")?)?,
        last_error: last_error.map(|Json(error)| error),
        idempotency_key: row.try_get("idempotency_key")?,
    })
}

fn event_from_row(row: &SqliteRow) -> Result<EventRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let level: String = row.try_get("level")?;
    let event_type: String = row.try_get("type")?;
    let data: Option<Json<serde_json::Value>> = row.try_get("data")?;
    Ok(EventRecord {
        id: EventId::parse(&id).map_err(|err| corrupt("event id", err))?,
        job_id: job_id(row.try_get("job_id")?)?,
        created_at: timestamp(row.try_get("created_at")?)?,
        level: match level.as_str() {
            "warn" => EventLevel::Warn,
            "error" => EventLevel::Error,
            _ => EventLevel::Info,
        },
        event_type: if event_type == "metrics" {
            EventType::Metrics
        } else {
            EventType::Message
        },
        message: row.try_get("message")?,
        data: data.map(|Json(data)| data),
    })
}

fn metric_from_row(row: &SqliteRow) -> Result<MetricPoint, StoreError> {
    Ok(MetricPoint {
        step: to_u64(row.try_get("step")?),
        epoch: row.try_get("epoch")?,
        train_loss: row.try_get("train_loss")?,
        valid_loss: row.try_get("valid_loss")?,
        learning_rate: row.try_get("learning_rate")?,
        grad_norm: row.try_get("grad_norm")?,
        tokens_per_second: row.try_get("tokens_per_second")?,
        trained_tokens: to_u64(row.try_get("trained_tokens")?),
        train_mean_token_accuracy: row.try_get("train_mean_token_accuracy")?,
        valid_mean_token_accuracy: row.try_get("valid_mean_token_accuracy")?,
        rewards: crate::records::rewards_from_columns(
            row.try_get("reward_chosen")?,
            row.try_get("reward_rejected")?,
            row.try_get("reward_accuracy")?,
            row.try_get("reward_margin")?,
        ),
    })
}

fn checkpoint_from_row(row: &SqliteRow) -> Result<CheckpointRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let Json(metrics): Json<serde_json::Value> = row.try_get("metrics")?;
    Ok(CheckpointRecord {
        id: CheckpointId::parse(&id).map_err(|err| corrupt("checkpoint id", err))?,
        job_id: job_id(row.try_get("job_id")?)?,
        created_at: timestamp(row.try_get("created_at")?)?,
        step: to_u64(row.try_get("step")?),
        metrics,
        artifact_key: row.try_get("artifact_key")?,
    })
}
