//! PgStore against a real Postgres; each test gets a fresh database from `#[sqlx::test]`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, TimeZone, Utc};
use serde_json::json;
use sqlx::PgPool;
use studio_core::dataset::DatasetFormat;
use studio_core::{CheckpointId, FileId, JobId, JobSpec, JobStatus};
use studio_store::{
    CancelOutcome, Clock, EventLevel, JobError, ManualClock, MetricPoint, NewCheckpoint, NewEvent,
    NewFile, NewJob, PageRequest, PgStore, Store, StoreError,
};

const LEASE: Duration = Duration::from_secs(30);

struct Fixture {
    store: PgStore,
    clock: Arc<ManualClock>,
    file: FileId,
}

async fn fixture(pool: PgPool) -> Fixture {
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
    ));
    let store = PgStore::new(pool, clock.clone());
    let file = FileId::new();
    store
        .insert_file(&NewFile {
            id: file.clone(),
            filename: "train.jsonl".into(),
            purpose: "fine-tune".into(),
            bytes: 10,
            sha256: "0".repeat(64),
            format: DatasetFormat::Chat,
            line_count: 1,
        })
        .await
        .unwrap();
    Fixture { store, clock, file }
}

impl Fixture {
    async fn queue_job(&self) -> JobId {
        let body = json!({"model": "tiny", "training_file": self.file.as_str()});
        let job = NewJob {
            id: JobId::new(),
            spec: JobSpec::parse(&body, 1).unwrap(),
            max_attempts: 2,
        };
        self.store.insert_job(&job).await.unwrap();
        // Distinct creation times keep the claim order obvious in failures.
        self.clock.advance(TimeDelta::seconds(1));
        job.id
    }
}

fn point(step: u64) -> MetricPoint {
    MetricPoint {
        step,
        epoch: step as f64 / 10.0,
        train_loss: 2.0 / step as f64,
        train_mean_token_accuracy: Some(0.5),
        valid_loss: None,
        valid_mean_token_accuracy: None,
        learning_rate: 1e-4,
        grad_norm: 1.5,
        tokens_per_second: 100.0,
        trained_tokens: step * 64,
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn claim_takes_oldest_queued_job(pool: PgPool) {
    let f = fixture(pool).await;
    let first = f.queue_job().await;
    f.queue_job().await;

    let job = f.store.claim_job("w1", LEASE).await.unwrap().unwrap();

    assert_eq!(job.id, first);
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!(job.locked_by.as_deref(), Some("w1"));
    assert_eq!(job.attempt, 1);
    assert_eq!(
        job.lease_expires_at,
        Some(f.clock.now() + TimeDelta::from_std(LEASE).unwrap())
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn claim_on_empty_queue_returns_none(pool: PgPool) {
    let f = fixture(pool).await;
    assert!(f.store.claim_job("w1", LEASE).await.unwrap().is_none());
}

#[sqlx::test(migrations = "../../migrations")]
async fn claim_skips_locked_job(pool: PgPool) {
    let f = fixture(pool.clone()).await;
    let first = f.queue_job().await;
    let second = f.queue_job().await;

    // Another transaction holds the row lock of the oldest job, as a concurrent claim would.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(first.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();

    let job = f.store.claim_job("w1", LEASE).await.unwrap().unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(job.id, second);
}

#[sqlx::test(migrations = "../../migrations")]
async fn concurrent_claimers_never_share_a_job(pool: PgPool) {
    let f = Arc::new(fixture(pool).await);
    let mut queued = Vec::new();
    for _ in 0..10 {
        queued.push(f.queue_job().await);
    }

    let mut tasks = Vec::new();
    for worker in 0..16 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            f.store
                .claim_job(&format!("w{worker}"), LEASE)
                .await
                .unwrap()
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        if let Some(job) = task.await.unwrap() {
            claimed.push(job.id);
        }
    }

    claimed.sort();
    queued.sort();
    assert_eq!(claimed, queued, "each queued job is claimed exactly once");
}

#[sqlx::test(migrations = "../../migrations")]
async fn heartbeat_extends_lease(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    let claimed = f.store.claim_job("w1", LEASE).await.unwrap().unwrap();

    f.clock.advance(TimeDelta::seconds(20));
    let beat = f.store.heartbeat(&id, "w1", LEASE).await.unwrap();

    assert_eq!(
        beat.lease_expires_at,
        claimed.lease_expires_at.unwrap() + TimeDelta::seconds(20)
    );
    assert!(!beat.cancel_requested);
}

#[sqlx::test(migrations = "../../migrations")]
async fn heartbeat_reports_cancel_request(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let outcome = f.store.request_cancel(&id).await.unwrap();
    let beat = f.store.heartbeat(&id, "w1", LEASE).await.unwrap();

    assert!(
        matches!(outcome, CancelOutcome::Requested(ref job) if job.status == JobStatus::Running)
    );
    assert!(beat.cancel_requested);
}

#[sqlx::test(migrations = "../../migrations")]
async fn heartbeat_of_other_worker_fails(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let err = f.store.heartbeat(&id, "w2", LEASE).await.unwrap_err();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn worker_that_lost_job_cannot_complete_it(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    f.clock.advance(TimeDelta::seconds(31));
    let rescued = f.store.rescue_expired_jobs().await.unwrap();
    let reclaimed = f.store.claim_job("w2", LEASE).await.unwrap().unwrap();
    let err = f
        .store
        .complete_job(&id, "w1", "ft:tiny:studio:x", 10)
        .await
        .unwrap_err();
    let job = f.store.get_job(&id).await.unwrap();

    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].status, JobStatus::Queued);
    assert_eq!(reclaimed.id, id);
    assert_eq!(reclaimed.attempt, 2);
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!(job.locked_by.as_deref(), Some("w2"));
}

#[sqlx::test(migrations = "../../migrations")]
async fn rescue_fails_job_out_of_attempts(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    for worker in ["w1", "w2"] {
        f.store.claim_job(worker, LEASE).await.unwrap().unwrap();
        f.clock.advance(TimeDelta::seconds(31));
        f.store.rescue_expired_jobs().await.unwrap();
    }

    let job = f.store.get_job(&id).await.unwrap();

    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.error.unwrap().code, "lease_expired");
    assert!(job.finished_at.is_some());
}

#[sqlx::test(migrations = "../../migrations")]
async fn rescue_leaves_live_lease_alone(pool: PgPool) {
    let f = fixture(pool).await;
    f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    f.clock.advance(TimeDelta::seconds(29));
    let rescued = f.store.rescue_expired_jobs().await.unwrap();

    assert!(rescued.is_empty());
}

#[sqlx::test(migrations = "../../migrations")]
async fn complete_sets_terminal_fields(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let job = f
        .store
        .complete_job(&id, "w1", "ft:tiny:studio:x", 640)
        .await
        .unwrap();

    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.fine_tuned_model.as_deref(), Some("ft:tiny:studio:x"));
    assert_eq!(job.trained_tokens, Some(640));
    assert_eq!(job.finished_at, Some(f.clock.now()));
    assert_eq!(job.locked_by, None);
}

#[sqlx::test(migrations = "../../migrations")]
async fn fail_stores_error_fields(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();
    let error = JobError {
        code: "invalid_training_file".into(),
        message: "too short".into(),
        param: Some("training_file".into()),
    };

    let job = f.store.fail_job(&id, "w1", &error).await.unwrap();

    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.error, Some(error));
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_of_queued_job_is_immediate(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;

    let outcome = f.store.request_cancel(&id).await.unwrap();
    let claimed = f.store.claim_job("w1", LEASE).await.unwrap();

    let CancelOutcome::Cancelled(job) = outcome else {
        panic!("expected Cancelled, got {outcome:?}")
    };
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(job.finished_at.is_some());
    assert!(claimed.is_none(), "a cancelled job must not be claimed");
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_of_finished_job_changes_nothing(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.request_cancel(&id).await.unwrap();

    let outcome = f.store.request_cancel(&id).await.unwrap();

    assert!(
        matches!(outcome, CancelOutcome::AlreadyFinished(ref job) if job.status == JobStatus::Cancelled)
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_of_unknown_job_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f.store.request_cancel(&JobId::new()).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn release_requeues_without_counting_attempt(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let job = f.store.release_job(&id, "w1").await.unwrap();

    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 0);
    assert_eq!(job.locked_by, None);
}

#[sqlx::test(migrations = "../../migrations")]
async fn database_rejects_terminal_state_without_finish_time(pool: PgPool) {
    let f = fixture(pool.clone()).await;
    let id = f.queue_job().await;

    let result = sqlx::query("UPDATE jobs SET status = 'cancelled' WHERE id = $1")
        .bind(id.as_str())
        .execute(&pool)
        .await;

    assert!(result.is_err());
}

#[sqlx::test(migrations = "../../migrations")]
async fn jobs_page_newest_first(pool: PgPool) {
    let f = fixture(pool).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(f.queue_job().await);
    }
    ids.reverse();

    let first = f.store.list_jobs(&PageRequest::first(2)).await.unwrap();
    let after = Some(first.data[1].id.to_string());
    let second = f
        .store
        .list_jobs(&PageRequest { after, limit: 3 })
        .await
        .unwrap();

    assert_eq!(
        first.data.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        ids[..2]
    );
    assert!(first.has_more);
    assert_eq!(
        second.data.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
        ids[2..]
    );
    assert!(!second.has_more);
}

#[sqlx::test(migrations = "../../migrations")]
async fn page_after_unknown_id_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f
        .store
        .list_jobs(&PageRequest {
            after: Some("ftjob-nope".into()),
            limit: 2,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn page_after_id_with_nul_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let after = PageRequest {
        after: Some("ftjob-a\0b".into()),
        limit: 2,
    };
    let job_id = f.queue_job().await;

    let files = f.store.list_files(&after).await.unwrap_err();
    let jobs = f.store.list_jobs(&after).await.unwrap_err();
    let events = f.store.list_events(&job_id, &after).await.unwrap_err();

    assert!(matches!(files, StoreError::NotFound { .. }), "{files:?}");
    assert!(matches!(jobs, StoreError::NotFound { .. }), "{jobs:?}");
    assert!(matches!(events, StoreError::NotFound { .. }), "{events:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn events_page_newest_first(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    for n in 0..5 {
        f.store
            .insert_event(&NewEvent::message(
                &id,
                EventLevel::Info,
                format!("event {n}"),
            ))
            .await
            .unwrap();
    }

    let first = f
        .store
        .list_events(&id, &PageRequest::first(3))
        .await
        .unwrap();
    let after = Some(first.data[2].id.to_string());
    let second = f
        .store
        .list_events(&id, &PageRequest { after, limit: 3 })
        .await
        .unwrap();

    let messages = |page: &studio_store::Page<studio_store::EventRecord>| {
        page.data
            .iter()
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(messages(&first), ["event 4", "event 3", "event 2"]);
    assert!(first.has_more);
    assert_eq!(messages(&second), ["event 1", "event 0"]);
    assert!(!second.has_more);
}

#[sqlx::test(migrations = "../../migrations")]
async fn metrics_list_by_step_and_overwrite(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let written = f
        .store
        .insert_metrics(&id, "w1", &[point(2), point(1)])
        .await
        .unwrap();
    let mut repeated = point(2);
    repeated.train_loss = 0.25;
    f.store
        .insert_metrics(&id, "w1", &[repeated.clone(), point(3)])
        .await
        .unwrap();
    let points = f.store.list_metrics(&id).await.unwrap();

    assert_eq!(written, 2);
    assert_eq!(points, vec![point(1), repeated, point(3)]);
}

#[sqlx::test(migrations = "../../migrations")]
async fn metrics_of_lost_job_are_rejected(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let err = f
        .store
        .insert_metrics(&id, "w2", &[point(1)])
        .await
        .unwrap_err();
    let points = f.store.list_metrics(&id).await.unwrap();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(points.is_empty());
}

#[sqlx::test(migrations = "../../migrations")]
async fn metrics_keep_token_accuracy(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();
    let mut evaluated = point(1);
    evaluated.valid_loss = Some(1.25);
    evaluated.valid_mean_token_accuracy = Some(0.75);

    f.store
        .insert_metrics(&id, "w1", &[evaluated.clone(), point(2)])
        .await
        .unwrap();
    let points = f.store.list_metrics(&id).await.unwrap();

    assert_eq!(points[0].train_mean_token_accuracy, Some(0.5));
    assert_eq!(points[0].valid_mean_token_accuracy, Some(0.75));
    assert_eq!(points[1].valid_mean_token_accuracy, None);
}

fn checkpoint(job_id: &JobId, step: u64) -> NewCheckpoint {
    NewCheckpoint {
        id: CheckpointId::new(),
        job_id: job_id.clone(),
        step,
        metrics: json!({"step": step, "train_loss": 1.0 / step as f64}),
        artifact_key: format!("jobs/{job_id}/checkpoints/step-{step}"),
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoints_list_latest_step_first(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();
    for step in [10, 30, 20] {
        f.store
            .insert_checkpoint("w1", &checkpoint(&id, step))
            .await
            .unwrap();
    }

    let first = f
        .store
        .list_checkpoints(&id, &PageRequest::first(2))
        .await
        .unwrap();
    let after = PageRequest {
        after: Some(first.data[1].id.to_string()),
        limit: 2,
    };
    let second = f.store.list_checkpoints(&id, &after).await.unwrap();

    let steps =
        |page: &[studio_store::CheckpointRecord]| page.iter().map(|c| c.step).collect::<Vec<_>>();
    assert_eq!(steps(&first.data), [30, 20]);
    assert!(first.has_more);
    assert_eq!(steps(&second.data), [10]);
    assert!(!second.has_more);
    assert_eq!(first.data[0].metrics["step"], 30);
    assert_eq!(
        first.data[0].artifact_key,
        format!("jobs/{id}/checkpoints/step-30")
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoint_of_same_step_is_replaced(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();
    let original = f
        .store
        .insert_checkpoint("w1", &checkpoint(&id, 5))
        .await
        .unwrap();

    let mut again = checkpoint(&id, 5);
    again.metrics = json!({"step": 5, "train_loss": 0.5});
    let replaced = f.store.insert_checkpoint("w1", &again).await.unwrap();
    let listed = f
        .store
        .list_checkpoints(&id, &PageRequest::first(10))
        .await
        .unwrap();

    assert_eq!(replaced.id, original.id);
    assert_eq!(listed.data.len(), 1);
    assert_eq!(listed.data[0].metrics["train_loss"], 0.5);
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoint_of_lost_job_is_rejected(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let err = f
        .store
        .insert_checkpoint("w2", &checkpoint(&id, 1))
        .await
        .unwrap_err();
    let listed = f
        .store
        .list_checkpoints(&id, &PageRequest::first(10))
        .await
        .unwrap();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(listed.data.is_empty());
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoint_of_other_job_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let id = f.queue_job().await;
    let other = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();
    let saved = f
        .store
        .insert_checkpoint("w1", &checkpoint(&id, 1))
        .await
        .unwrap();

    let found = f.store.get_checkpoint(&id, &saved.id).await.unwrap();
    let err = f.store.get_checkpoint(&other, &saved.id).await.unwrap_err();

    assert_eq!(found, saved);
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "checkpoint",
                ..
            }
        ),
        "{err:?}"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn files_page_and_get(pool: PgPool) {
    let f = fixture(pool).await;

    let file = f.store.get_file(&f.file).await.unwrap();
    let page = f.store.list_files(&PageRequest::first(10)).await.unwrap();
    let missing = f.store.get_file(&FileId::new()).await.unwrap_err();

    assert_eq!(file.filename, "train.jsonl");
    assert_eq!(file.format, DatasetFormat::Chat);
    assert_eq!(page.data, vec![file]);
    assert!(matches!(
        missing,
        StoreError::NotFound { entity: "file", .. }
    ));
}
