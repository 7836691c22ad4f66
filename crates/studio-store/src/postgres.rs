//! The Postgres backend of [`Store`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
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
use crate::event_bus::EventSubscription;
use crate::pg_listener::{PgEventListener, EVENTS_CHANNEL};
use crate::{Clock, Store, StoreError};

/// How long a query waits for a pool connection, including the attempts to open one, before it
/// fails with [`StoreError::Unavailable`]. It is short so that while Postgres restarts or is
/// down, an API request returns 503 within seconds instead of hanging.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens a pool on `database_url`, failing fast when the server cannot be reached.
pub(crate) async fn connect(database_url: &str) -> Result<PgPool, StoreError> {
    if !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://") {
        return Err(StoreError::Conflict(
            "unsupported database URL: use postgres://USER@HOST:PORT/DATABASE or sqlite://PATH".into(),
        ));
    }
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
        .connect(database_url)
        .await?;
    Ok(pool)
}

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    events: PgEventListener,
}

impl PgStore {
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>) -> Self {
        Self {
            events: PgEventListener::new(pool.clone()),
            pool,
            clock,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn lease_end(&self, lease: Duration) -> Result<DateTime<Utc>, StoreError> {
        let lease = TimeDelta::from_std(lease)
            .map_err(|_| StoreError::Conflict(format!("lease of {lease:?} is too long")))?;
        Ok(self.clock.now() + lease)
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
        // Postgres text cannot hold NUL, so the query would fail; no stored id contains one.
        if after.contains('\0') {
            return Err(StoreError::not_found(entity, after));
        }
        let sql = format!("SELECT seq FROM {table} WHERE id = $1");
        let seq: Option<i64> = sqlx::query_scalar(&sql)
            .bind(after)
            .fetch_optional(&self.pool)
            .await?;
        seq.ok_or_else(|| StoreError::not_found(entity, after))
    }

    /// Runs a worker-side update that returns the job, or explains why it changed nothing.
    async fn owned_update(
        &self,
        id: &JobId,
        worker_id: &str,
        row: Option<PgRow>,
    ) -> Result<JobRecord, StoreError> {
        match row {
            Some(row) => job_from_row(&row),
            None => {
                let job = self.get_job(id).await?;
                Err(StoreError::Conflict(format!(
                    "job {id} is no longer owned by worker {worker_id}: it is {} and locked by {}",
                    job.status,
                    job.locked_by.as_deref().unwrap_or("nobody")
                )))
            }
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

/// The first key of the `pg_advisory_xact_lock(class, hashtext(job_id))` that orders a job's
/// event inserts. It is ASCII "EVNT" and keeps those locks apart from other advisory locks.
const EVENT_LOCK_CLASS: i32 = 0x4556_4E54;

#[async_trait]
impl Store for PgStore {
    async fn insert_file(&self, file: &NewFile) -> Result<FileRecord, StoreError> {
        let sql = format!(
            "INSERT INTO files (id, created_at, filename, purpose, bytes, sha256, format, line_count, idempotency_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING {FILE_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(file.id.as_str())
            .bind(self.clock.now())
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
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE idempotency_key = $1");
        let existing = file_from_row(&sqlx::query(&sql).bind(key).fetch_one(&self.pool).await?)?;
        if !same_upload(&existing, file) {
            return Err(file_idempotency_mismatch(key, &existing.id));
        }
        Ok(existing)
    }

    async fn get_file(&self, id: &FileId) -> Result<FileRecord, StoreError> {
        let sql = format!("SELECT {FILE_COLUMNS} FROM files WHERE id = $1");
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
            format!("SELECT {FILE_COLUMNS} FROM files WHERE seq < $1 ORDER BY seq DESC LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(before)
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        into_page(rows, page.limit, file_from_row)
    }

    async fn insert_job(&self, job: &NewJob) -> Result<JobRecord, StoreError> {
        let spec = &job.spec;
        let now = self.clock.now();
        // Safe under concurrency: of two inserts with one key, the second waits on the unique
        // index until the first commits, then does nothing and reads the first one's row.
        let sql = format!(
            "INSERT INTO jobs (id, created_at, updated_at, status, model, training_file, validation_file, suffix,
                               seed, metadata, spec, hyperparameters, max_attempts, idempotency_key, request_hash)
             VALUES ($1, $2, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(job.id.as_str())
            .bind(now)
            .bind(&spec.model)
            .bind(spec.training_file.as_str())
            .bind(spec.validation_file.as_ref().map(|id| id.as_str()))
            .bind(spec.suffix.as_deref())
            .bind(to_i64(spec.seed))
            .bind(spec.metadata.as_ref().map(Json))
            .bind(Json(spec))
            .bind(Json(spec.hyperparameters()))
            .bind(i32::try_from(job.max_attempts).unwrap_or(i32::MAX))
            .bind(job.idempotency_key.as_deref())
            .bind(job.request_hash.as_deref())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return job_from_row(&row);
        }
        // Only a stored idempotency key makes the insert do nothing.
        let key = job.idempotency_key.as_deref().unwrap_or_default();
        let sql = format!("SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = $1");
        let row = sqlx::query(&sql).bind(key).fetch_one(&self.pool).await?;
        let stored_hash: Option<String> = row.try_get("request_hash")?;
        let existing = job_from_row(&row)?;
        if stored_hash != job.request_hash {
            return Err(idempotency_mismatch(key, &existing.id));
        }
        Ok(existing)
    }

    async fn get_job(&self, id: &JobId) -> Result<JobRecord, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
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
            format!("SELECT {JOB_COLUMNS} FROM jobs WHERE seq < $1 ORDER BY seq DESC LIMIT $2");
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
        // Safe under concurrency: the UPDATE locks the row, and under READ COMMITTED a
        // concurrent claim that committed first is seen, so a job that just became running
        // gets the flag instead of being cancelled under its worker. The CASEs read the old
        // row, so `status` and `finished_at` change together.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN status = 'running' THEN status ELSE 'cancelled' END,
                 finished_at = CASE WHEN status = 'running' THEN finished_at ELSE $2 END,
                 cancel_requested = TRUE,
                 run_after = NULL,
                 updated_at = $2
             WHERE id = $1 AND status IN ('validating_files', 'queued', 'paused', 'running')
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(self.clock.now())
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
        // Safe under concurrency: like request_cancel, the UPDATE re-checks the row after a
        // concurrent claim commits, so a job that just became running gets the flag instead.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN status = 'running' THEN status ELSE 'paused' END,
                 pause_requested = (status = 'running'),
                 run_after = NULL,
                 updated_at = $2
             WHERE id = $1
               AND (status IN ('validating_files', 'queued')
                    OR (status = 'running' AND NOT cancel_requested))
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(self.clock.now())
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
            "UPDATE jobs SET status = 'queued', run_after = NULL, updated_at = $2
             WHERE id = $1 AND status = 'paused'
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(self.clock.now())
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
        // Safe under concurrency: FOR NO KEY UPDATE SKIP LOCKED makes a concurrent claimer skip
        // the row this one locked instead of waiting for it. NO KEY UPDATE does not conflict with
        // the KEY SHARE lock that an event insert takes on the job through its foreign key, so
        // the job is not skipped while one of its events is written. The outer UPDATE runs in the same
        // statement, so no other transaction can claim the row between the select and the update.
        let sql = format!(
            "WITH next AS (
                 SELECT id FROM jobs
                 WHERE status = 'queued' AND attempt < max_attempts
                   AND (run_after IS NULL OR run_after <= $3)
                 ORDER BY seq
                 LIMIT 1
                 FOR NO KEY UPDATE SKIP LOCKED
             )
             UPDATE jobs SET
                 status = 'running',
                 locked_by = $1,
                 lease_expires_at = $2,
                 run_after = NULL,
                 attempt = jobs.attempt + 1,
                 started_at = COALESCE(jobs.started_at, $3),
                 updated_at = $3
             FROM next
             WHERE jobs.id = next.id
             RETURNING {}",
            qualified_job_columns()
        );
        let now = self.clock.now();
        let row = sqlx::query(&sql)
            .bind(worker_id)
            .bind(self.lease_end(lease)?)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| job_from_row(&row)).transpose()
    }

    async fn heartbeat(
        &self,
        id: &JobId,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Heartbeat, StoreError> {
        // Safe under concurrency: the lease is extended only while this worker still owns the
        // running job. After a rescue or a finish the row no longer matches, so nothing changes.
        let row = sqlx::query(
            "UPDATE jobs SET lease_expires_at = $3, updated_at = $4
             WHERE id = $1 AND locked_by = $2 AND status = 'running'
             RETURNING cancel_requested, pause_requested, lease_expires_at",
        )
        .bind(id.as_str())
        .bind(worker_id)
        .bind(self.lease_end(lease)?)
        .bind(self.clock.now())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Heartbeat {
                cancel_requested: row.try_get("cancel_requested")?,
                pause_requested: row.try_get("pause_requested")?,
                lease_expires_at: row.try_get("lease_expires_at")?,
            }),
            None => self
                .owned_update(id, worker_id, None)
                .await
                .map(|_| unreachable!("owned_update(None) is an error")),
        }
    }

    async fn complete_job(
        &self,
        id: &JobId,
        worker_id: &str,
        fine_tuned_model: &str,
        trained_tokens: u64,
    ) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: only the owner of the running job can finish it, so a worker
        // whose lease expired and whose job was claimed again cannot overwrite the new run.
        let sql = format!(
            "UPDATE jobs SET status = 'succeeded', finished_at = $3, updated_at = $3,
                 fine_tuned_model = $4, trained_tokens = $5, locked_by = NULL, lease_expires_at = NULL
             WHERE id = $1 AND locked_by = $2 AND status = 'running'
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.clock.now())
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
        // Safe under concurrency: the same ownership guard as complete_job.
        let sql = format!(
            "UPDATE jobs SET status = 'failed', finished_at = $3, updated_at = $3, error = $4,
                 locked_by = NULL, lease_expires_at = NULL
             WHERE id = $1 AND locked_by = $2 AND status = 'running'
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.clock.now())
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
        // Safe under concurrency: the same ownership guard as complete_job.
        let sql = format!(
            "UPDATE jobs SET status = 'cancelled', finished_at = $3, updated_at = $3,
                 locked_by = NULL, lease_expires_at = NULL
             WHERE id = $1 AND locked_by = $2 AND status = 'running'
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.clock.now())
            .fetch_optional(&self.pool)
            .await?;
        self.owned_update(id, worker_id, row).await
    }

    async fn release_job(&self, id: &JobId, worker_id: &str) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: the same ownership guard as complete_job; the job becomes
        // claimable only once this statement commits.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN cancel_requested THEN 'cancelled'
                               WHEN pause_requested THEN 'paused' ELSE 'queued' END,
                 finished_at = CASE WHEN cancel_requested THEN $3 ELSE finished_at END,
                 updated_at = $3, attempt = attempt - 1, pause_requested = FALSE,
                 locked_by = NULL, lease_expires_at = NULL
             WHERE id = $1 AND locked_by = $2 AND status = 'running'
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.clock.now())
            .fetch_optional(&self.pool)
            .await?;
        self.owned_update(id, worker_id, row).await
    }

    async fn pause_running_job(
        &self,
        id: &JobId,
        worker_id: &str,
    ) -> Result<JobRecord, StoreError> {
        // Safe under concurrency: the same ownership guard as complete_job.
        let sql = format!(
            "UPDATE jobs SET
                 status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'paused' END,
                 finished_at = CASE WHEN cancel_requested THEN $3 ELSE finished_at END,
                 updated_at = $3, attempt = attempt - 1,
                 pause_requested = FALSE, locked_by = NULL, lease_expires_at = NULL
             WHERE id = $1 AND locked_by = $2 AND status = 'running'
             RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .bind(self.clock.now())
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
        // Safe under concurrency: FOR UPDATE locks the owned row until the commit, so no rescue,
        // cancel or pause request changes it between the read and the update.
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT {ENDING_ATTEMPT_COLUMNS} FROM jobs
             WHERE id = $1 AND locked_by = $2 AND status = 'running'
             FOR UPDATE"
        );
        let row = sqlx::query(&sql)
            .bind(id.as_str())
            .bind(worker_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return self.owned_update(id, worker_id, None).await;
        };
        let now = self.clock.now();
        let outcome = end_attempt(&ending_attempt_from_row(&row)?, error.clone(), now);
        let job = apply_attempt_outcome(&mut tx, id, &outcome, now).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn rescue_expired_jobs(&self) -> Result<Vec<RescuedJob>, StoreError> {
        // Safe under concurrency: FOR NO KEY UPDATE re-checks each row after a concurrent
        // heartbeat commits, so a lease extended in the meantime is not rescued. SKIP LOCKED
        // leaves a row that a heartbeat or another rescuer has locked for the next round. The rows stay
        // locked until the commit, so each update applies to the state that was read.
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT {ENDING_ATTEMPT_COLUMNS} FROM jobs
             WHERE status = 'running' AND lease_expires_at < $1
             ORDER BY seq
             FOR NO KEY UPDATE SKIP LOCKED"
        );
        let rows = sqlx::query(&sql).bind(now).fetch_all(&mut *tx).await?;
        let mut rescued = Vec::with_capacity(rows.len());
        for row in &rows {
            let attempt = ending_attempt_from_row(row)?;
            let worker: String = row.try_get("locked_by")?;
            let expired_at: DateTime<Utc> = row.try_get("lease_expires_at")?;
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
        // Safe under concurrency: the per-job advisory lock is taken before the INSERT draws its
        // `seq` and is held until commit, so a job's events commit in `seq` order. A reader that
        // continues after the last `seq` it read therefore never skips a lower one that commits
        // later. Postgres delivers the notification at commit, so a woken reader finds the row.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2)), pg_notify($3, $2)")
            .bind(EVENT_LOCK_CLASS)
            .bind(event.job_id.as_str())
            .bind(EVENTS_CHANNEL)
            .execute(&mut *tx)
            .await?;
        let sql = format!(
            "INSERT INTO job_events (id, job_id, created_at, level, type, message, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             RETURNING {EVENT_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(EventId::new().as_str())
            .bind(event.job_id.as_str())
            .bind(self.clock.now())
            .bind(event.level.as_str())
            .bind(event.event_type.as_str())
            .bind(&event.message)
            .bind(event.data.as_ref().map(Json))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
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
                // Postgres text cannot hold NUL, so the query would fail; no stored id contains one.
                let seq: Option<i64> = if after.contains('\0') {
                    None
                } else {
                    sqlx::query_scalar("SELECT seq FROM job_events WHERE id = $1 AND job_id = $2")
                        .bind(after)
                        .bind(job_id.as_str())
                        .fetch_optional(&self.pool)
                        .await?
                };
                seq.ok_or_else(|| {
                    StoreError::not_found("event", format!("{after} of fine-tuning job {job_id}"))
                })?
            }
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
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
        let rows = match after {
            None => {
                let sql = format!(
                    "SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 ORDER BY seq LIMIT $2"
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
                     WHERE job_id = $1
                       AND seq > (SELECT seq FROM job_events WHERE id = $2 AND job_id = $1)
                     ORDER BY seq LIMIT $3"
                );
                let rows = sqlx::query(&sql)
                    .bind(job_id.as_str())
                    .bind(after.as_str())
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                if rows.is_empty() {
                    let known: Option<i64> = sqlx::query_scalar(
                        "SELECT seq FROM job_events WHERE id = $1 AND job_id = $2",
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
        self.events.subscribe().await
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
        // Safe under concurrency: rows are written only while this worker owns the running
        // job, checked in the same statement, so a worker that lost its lease cannot mix its
        // steps into the next run's curve.
        let result = sqlx::query(
            "INSERT INTO job_metrics (job_id, step, created_at, epoch, train_loss, valid_loss, learning_rate,
                                      grad_norm, tokens_per_second, trained_tokens,
                                      train_mean_token_accuracy, valid_mean_token_accuracy,
                                      reward_chosen, reward_rejected, reward_accuracy, reward_margin)
             SELECT $1, m.step, $3, m.epoch, m.train_loss, m.valid_loss, m.learning_rate, m.grad_norm,
                    m.tokens_per_second, m.trained_tokens, m.train_mean_token_accuracy,
                    m.valid_mean_token_accuracy, m.reward_chosen, m.reward_rejected, m.reward_accuracy,
                    m.reward_margin
             FROM UNNEST($4::BIGINT[], $5::FLOAT8[], $6::FLOAT8[], $7::FLOAT8[], $8::FLOAT8[], $9::FLOAT8[],
                         $10::FLOAT8[], $11::BIGINT[], $12::FLOAT8[], $13::FLOAT8[], $14::FLOAT8[],
                         $15::FLOAT8[], $16::FLOAT8[], $17::FLOAT8[])
                  AS m(step, epoch, train_loss, valid_loss, learning_rate, grad_norm, tokens_per_second,
                       trained_tokens, train_mean_token_accuracy, valid_mean_token_accuracy,
                       reward_chosen, reward_rejected, reward_accuracy, reward_margin)
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1 AND locked_by = $2 AND status = 'running')
             ON CONFLICT (job_id, step) DO UPDATE SET
                 created_at = EXCLUDED.created_at, epoch = EXCLUDED.epoch, train_loss = EXCLUDED.train_loss,
                 valid_loss = EXCLUDED.valid_loss, learning_rate = EXCLUDED.learning_rate,
                 grad_norm = EXCLUDED.grad_norm, tokens_per_second = EXCLUDED.tokens_per_second,
                 trained_tokens = EXCLUDED.trained_tokens,
                 train_mean_token_accuracy = EXCLUDED.train_mean_token_accuracy,
                 valid_mean_token_accuracy = EXCLUDED.valid_mean_token_accuracy,
                 reward_chosen = EXCLUDED.reward_chosen, reward_rejected = EXCLUDED.reward_rejected,
                 reward_accuracy = EXCLUDED.reward_accuracy, reward_margin = EXCLUDED.reward_margin",
        )
        .bind(job_id.as_str())
        .bind(worker_id)
        .bind(self.clock.now())
        .bind(points.iter().map(|p| to_i64(p.step)).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.epoch).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.train_loss).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.valid_loss).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.learning_rate).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.grad_norm).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.tokens_per_second).collect::<Vec<_>>())
        .bind(points.iter().map(|p| to_i64(p.trained_tokens)).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.train_mean_token_accuracy).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.valid_mean_token_accuracy).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.rewards.map(|r| r.reward_chosen)).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.rewards.map(|r| r.reward_rejected)).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.rewards.map(|r| r.reward_accuracy)).collect::<Vec<_>>())
        .bind(points.iter().map(|p| p.rewards.map(|r| r.reward_margin)).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return self.owned_update(job_id, worker_id, None).await.map(|_| 0);
        }
        Ok(result.rows_affected())
    }

    async fn list_metrics(&self, job_id: &JobId) -> Result<Vec<MetricPoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT step, epoch, train_loss, valid_loss, learning_rate, grad_norm, tokens_per_second, trained_tokens,
                    train_mean_token_accuracy, valid_mean_token_accuracy,
                    reward_chosen, reward_rejected, reward_accuracy, reward_margin
             FROM job_metrics WHERE job_id = $1 ORDER BY step",
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
        // Safe under concurrency: the row is written only while this worker owns the running
        // job, checked in the same statement, like insert_metrics.
        let sql = format!(
            "INSERT INTO checkpoints (id, job_id, step, created_at, metrics, artifact_key)
             SELECT $1, $2, $4, $5, $6, $7
             WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $2 AND locked_by = $3 AND status = 'running')
             ON CONFLICT (job_id, step) DO UPDATE SET
                 created_at = EXCLUDED.created_at, metrics = EXCLUDED.metrics,
                 artifact_key = EXCLUDED.artifact_key
             RETURNING {CHECKPOINT_COLUMNS}"
        );
        let job_id = &checkpoint.job_id;
        let row = sqlx::query(&sql)
            .bind(checkpoint.id.as_str())
            .bind(job_id.as_str())
            .bind(worker_id)
            .bind(to_i64(checkpoint.step))
            .bind(self.clock.now())
            .bind(Json(&checkpoint.metrics))
            .bind(&checkpoint.artifact_key)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => checkpoint_from_row(&row),
            None => self
                .owned_update(job_id, worker_id, None)
                .await
                .map(|_| unreachable!("owned_update(None) is an error")),
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
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 AND step < $2
             ORDER BY step DESC LIMIT $3"
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
            format!("SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = $1 AND job_id = $2");
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

/// Writes the new state of a running job whose attempt ended, in the transaction that locked it.
async fn apply_attempt_outcome(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: &JobId,
    outcome: &AttemptOutcome,
    now: DateTime<Utc>,
) -> Result<JobRecord, StoreError> {
    let sql = format!(
        "UPDATE jobs SET status = $2, finished_at = $3, error = COALESCE($4, error), last_error = $5,
             run_after = $6, pause_requested = FALSE, locked_by = NULL, lease_expires_at = NULL,
             updated_at = $7
         WHERE id = $1 AND status = 'running'
         RETURNING {JOB_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(id.as_str())
        .bind(outcome.status.as_str())
        .bind(outcome.finished_at)
        .bind(outcome.error.as_ref().map(Json))
        .bind(Json(&outcome.last_error))
        .bind(outcome.run_after)
        .bind(now)
        .fetch_one(&mut **tx)
        .await?;
    job_from_row(&row)
}

fn ending_attempt_from_row(row: &PgRow) -> Result<EndingAttempt, StoreError> {
    let attempt: i32 = row.try_get("attempt")?;
    let max_attempts: i32 = row.try_get("max_attempts")?;
    Ok(EndingAttempt {
        id: job_id(row.try_get("id")?)?,
        attempt: attempt.max(0) as u32,
        max_attempts: max_attempts.max(0) as u32,
        cancel_requested: row.try_get("cancel_requested")?,
        pause_requested: row.try_get("pause_requested")?,
    })
}

fn qualified_job_columns() -> String {
    JOB_COLUMNS
        .split(", ")
        .map(|column| format!("jobs.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn file_from_row(row: &PgRow) -> Result<FileRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let format: String = row.try_get("format")?;
    Ok(FileRecord {
        id: FileId::parse(&id).map_err(|err| corrupt("file id", err))?,
        created_at: row.try_get("created_at")?,
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

fn job_from_row(row: &PgRow) -> Result<JobRecord, StoreError> {
    let Json(spec): Json<JobSpec> = row.try_get("spec")?;
    let error: Option<Json<JobError>> = row.try_get("error")?;
    let last_error: Option<Json<JobError>> = row.try_get("last_error")?;
    let trained_tokens: Option<i64> = row.try_get("trained_tokens")?;
    let attempt: i32 = row.try_get("attempt")?;
    let max_attempts: i32 = row.try_get("max_attempts")?;
    Ok(JobRecord {
        id: job_id(row.try_get("id")?)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        status: status(row.try_get("status")?)?,
        spec,
        error: error.map(|Json(error)| error),
        fine_tuned_model: row.try_get("fine_tuned_model")?,
        trained_tokens: trained_tokens.map(to_u64),
        locked_by: row.try_get("locked_by")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        attempt: attempt.max(0) as u32,
        max_attempts: max_attempts.max(0) as u32,
        cancel_requested: row.try_get("cancel_requested")?,
        pause_requested: row.try_get("pause_requested")?,
        run_after: row.try_get("run_after")?,
        last_error: last_error.map(|Json(error)| error),
        idempotency_key: row.try_get("idempotency_key")?,
    })
}

fn event_from_row(row: &PgRow) -> Result<EventRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let level: String = row.try_get("level")?;
    let event_type: String = row.try_get("type")?;
    let data: Option<Json<serde_json::Value>> = row.try_get("data")?;
    Ok(EventRecord {
        id: EventId::parse(&id).map_err(|err| corrupt("event id", err))?,
        job_id: job_id(row.try_get("job_id")?)?,
        created_at: row.try_get("created_at")?,
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

fn metric_from_row(row: &PgRow) -> Result<MetricPoint, StoreError> {
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

fn checkpoint_from_row(row: &PgRow) -> Result<CheckpointRecord, StoreError> {
    let id: String = row.try_get("id")?;
    let Json(metrics): Json<serde_json::Value> = row.try_get("metrics")?;
    Ok(CheckpointRecord {
        id: CheckpointId::parse(&id).map_err(|err| corrupt("checkpoint id", err))?,
        job_id: job_id(row.try_get("job_id")?)?,
        created_at: row.try_get("created_at")?,
        step: to_u64(row.try_get("step")?),
        metrics,
        artifact_key: row.try_get("artifact_key")?,
    })
}
