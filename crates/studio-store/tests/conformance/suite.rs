//! The cases of the `Store` contract, written once against `&dyn Store` and an injected clock.
//! Each backend module turns every case into a test with `conformance_cases!`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, TimeZone, Utc};
use serde_json::json;
use studio_core::dataset::DatasetFormat;
use studio_core::{CheckpointId, EventId, FileId, JobId, JobSpec, JobStatus};
use studio_store::{
    CancelOutcome, Clock, EventLevel, EventNotice, EventRecord, JobError, ManualClock, MetricPoint,
    NewCheckpoint, NewEvent, NewFile, NewJob, PageRequest, Store, StoreError,
};
use tokio::time::timeout;

pub use crate::queue::*;

pub const LEASE: Duration = Duration::from_secs(30);

/// Longer than any retry backoff, so a requeued job is claimable after the clock moves by it.
pub const RETRY_BACKOFF_PASSED: TimeDelta = TimeDelta::seconds(601);

/// How long a case waits for an event notification before it fails.
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Generates one test per case in the calling module. That module defines `Backend`, with
/// `async fn open() -> Option<Backend>` (`None` when the backend is not configured), a
/// `fixture` field and `async fn close(self)`.
macro_rules! conformance_cases {
    () => {
        conformance_cases!(
            claim_takes_oldest_queued_job,
            claim_on_empty_queue_returns_none,
            claim_skips_running_and_cancelled_jobs,
            concurrent_claimers_never_share_a_job,
            heartbeat_extends_lease,
            heartbeat_reports_cancel_request,
            heartbeat_of_other_worker_fails,
            worker_that_lost_job_cannot_complete_it,
            worker_that_lost_job_cannot_change_it,
            rescue_requeues_and_counts_attempt,
            rescue_fails_job_out_of_attempts,
            rescue_leaves_live_lease_alone,
            rescue_cancels_job_with_cancel_request,
            complete_sets_terminal_fields,
            fail_stores_error_fields,
            cancel_of_queued_job_is_immediate,
            cancel_of_running_job_is_requested,
            cancel_running_job_sets_cancelled,
            cancel_of_finished_job_changes_nothing,
            cancel_of_unknown_job_is_not_found,
            release_requeues_without_counting_attempt,
            jobs_page_newest_first,
            succeeded_jobs_list_newest_first,
            page_after_unknown_id_is_not_found,
            page_after_id_with_nul_is_not_found,
            events_page_newest_first,
            events_page_after_foreign_id_is_not_found,
            event_keeps_level_type_and_data,
            events_since_list_oldest_first,
            events_since_unknown_or_foreign_id_is_not_found,
            concurrent_event_inserts_leave_no_gaps,
            event_insert_wakes_subscriber,
            metrics_list_by_step_and_overwrite,
            metrics_of_lost_job_are_rejected,
            metrics_keep_token_accuracy,
            metrics_keep_dpo_rewards,
            checkpoints_list_latest_step_first,
            checkpoint_of_same_step_is_replaced,
            checkpoint_of_lost_job_is_rejected,
            checkpoint_of_other_job_is_not_found,
            files_page_and_get,
            duplicate_file_id_is_conflict,
            idempotent_file_insert_returns_first_file,
            idempotent_file_insert_with_other_content_conflicts,
            concurrent_idempotent_file_inserts_store_one_file,
            job_with_unknown_file_is_conflict,
            rescued_job_waits_for_backoff,
            backoff_lets_later_job_be_claimed,
            rescue_records_worker_lost,
            out_of_attempts_keeps_last_error,
            requeue_backs_off_and_keeps_error,
            requeue_on_last_attempt_fails,
            requeue_by_other_worker_is_conflict,
            pause_of_queued_job_is_immediate,
            pause_of_running_job_is_requested,
            heartbeat_reports_pause_request,
            pause_of_paused_job_changes_nothing,
            pause_of_finished_job_is_conflict,
            pause_after_cancel_request_is_conflict,
            pause_running_job_by_owner_only,
            resume_queues_paused_job,
            resume_clears_backoff,
            resume_of_unpaused_job_is_conflict,
            rescue_pauses_job_with_pause_request,
            release_of_pause_requested_job_pauses_it,
            pause_running_job_after_cancel_request_cancels,
            release_of_cancel_requested_job_cancels_it,
            cancel_of_paused_job_is_immediate,
            cancel_of_backing_off_job_is_immediate,
            idempotent_insert_returns_first_job,
            idempotent_insert_with_other_body_conflicts,
            jobs_without_key_are_independent,
            concurrent_idempotent_inserts_store_one_job,
        );
    };
    ($($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(backend) = Backend::open().await else {
                    return;
                };
                crate::suite::$case(&backend.fixture).await;
                backend.close().await;
            }
        )+
    };
}

/// A store with one uploaded file, on a clock that moves only when a case advances it.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub clock: Arc<ManualClock>,
    pub file: FileId,
}

pub fn start_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
    ))
}

/// Uploads the training file every job of the cases refers to.
pub async fn fixture(store: Arc<dyn Store>, clock: Arc<ManualClock>) -> Fixture {
    let file = FileId::new();
    store.insert_file(&new_file(&file)).await.unwrap();
    Fixture { store, clock, file }
}

fn new_file(id: &FileId) -> NewFile {
    NewFile {
        id: id.clone(),
        filename: "train.jsonl".into(),
        purpose: "fine-tune".into(),
        bytes: 10,
        sha256: "0".repeat(64),
        format: DatasetFormat::Chat,
        line_count: 1,
        idempotency_key: None,
    }
}

impl Fixture {
    pub async fn queue_job(&self) -> JobId {
        let body = json!({"model": "tiny", "training_file": self.file.as_str()});
        let job = NewJob {
            id: JobId::new(),
            spec: JobSpec::parse(&body, 1).unwrap(),
            max_attempts: 2,
            idempotency_key: None,
            request_hash: None,
        };
        self.store.insert_job(&job).await.unwrap();
        // Distinct creation times keep the claim order obvious in failures.
        self.clock.advance(TimeDelta::seconds(1));
        job.id
    }

    /// Claims `id` for w1, lets its lease expire and lets w2 claim it again after the retry
    /// backoff.
    async fn hand_job_to_second_worker(&self, id: &JobId) {
        self.store.claim_job("w1", LEASE).await.unwrap().unwrap();
        self.clock.advance(TimeDelta::seconds(31));
        self.store.rescue_expired_jobs().await.unwrap();
        self.clock.advance(RETRY_BACKOFF_PASSED);
        let reclaimed = self.store.claim_job("w2", LEASE).await.unwrap().unwrap();
        assert_eq!(&reclaimed.id, id);
    }
}

pub fn point(step: u64) -> MetricPoint {
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
        rewards: None,
    }
}

pub async fn claim_takes_oldest_queued_job(f: &Fixture) {
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

pub async fn claim_on_empty_queue_returns_none(f: &Fixture) {
    assert!(f.store.claim_job("w1", LEASE).await.unwrap().is_none());
}

pub async fn concurrent_claimers_never_share_a_job(f: &Fixture) {
    let mut queued = Vec::new();
    for _ in 0..10 {
        queued.push(f.queue_job().await);
    }

    let mut tasks = Vec::new();
    for worker in 0..16 {
        let store = f.store.clone();
        tasks.push(tokio::spawn(async move {
            store
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

pub async fn heartbeat_extends_lease(f: &Fixture) {
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

pub async fn heartbeat_reports_cancel_request(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let outcome = f.store.request_cancel(&id).await.unwrap();
    let beat = f.store.heartbeat(&id, "w1", LEASE).await.unwrap();

    assert!(
        matches!(outcome, CancelOutcome::Requested(ref job) if job.status == JobStatus::Running)
    );
    assert!(beat.cancel_requested);
}

pub async fn heartbeat_of_other_worker_fails(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let err = f.store.heartbeat(&id, "w2", LEASE).await.unwrap_err();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

pub async fn worker_that_lost_job_cannot_complete_it(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    f.clock.advance(TimeDelta::seconds(31));
    let rescued = f.store.rescue_expired_jobs().await.unwrap();
    f.clock.advance(RETRY_BACKOFF_PASSED);
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

pub async fn rescue_fails_job_out_of_attempts(f: &Fixture) {
    let id = f.queue_job().await;
    for worker in ["w1", "w2"] {
        f.store.claim_job(worker, LEASE).await.unwrap().unwrap();
        f.clock.advance(TimeDelta::seconds(31));
        f.store.rescue_expired_jobs().await.unwrap();
        f.clock.advance(RETRY_BACKOFF_PASSED);
    }

    let job = f.store.get_job(&id).await.unwrap();

    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.error.unwrap().code, "worker_lost");
    assert!(job.finished_at.is_some());
}

pub async fn rescue_leaves_live_lease_alone(f: &Fixture) {
    f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    f.clock.advance(TimeDelta::seconds(29));
    let rescued = f.store.rescue_expired_jobs().await.unwrap();

    assert!(rescued.is_empty());
}

pub async fn complete_sets_terminal_fields(f: &Fixture) {
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

pub async fn fail_stores_error_fields(f: &Fixture) {
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

pub async fn cancel_of_queued_job_is_immediate(f: &Fixture) {
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

pub async fn cancel_of_finished_job_changes_nothing(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.request_cancel(&id).await.unwrap();

    let outcome = f.store.request_cancel(&id).await.unwrap();

    assert!(
        matches!(outcome, CancelOutcome::AlreadyFinished(ref job) if job.status == JobStatus::Cancelled)
    );
}

pub async fn cancel_of_unknown_job_is_not_found(f: &Fixture) {
    let err = f.store.request_cancel(&JobId::new()).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

pub async fn release_requeues_without_counting_attempt(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();

    let job = f.store.release_job(&id, "w1").await.unwrap();

    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 0);
    assert_eq!(job.locked_by, None);
}

pub async fn jobs_page_newest_first(f: &Fixture) {
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

pub async fn page_after_unknown_id_is_not_found(f: &Fixture) {
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

pub async fn page_after_id_with_nul_is_not_found(f: &Fixture) {
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

pub async fn events_page_after_foreign_id_is_not_found(f: &Fixture) {
    let id = f.queue_job().await;
    let other = f.queue_job().await;
    let mut inserted = Vec::new();
    for job in [&id, &other, &id] {
        let event = NewEvent::message(job, EventLevel::Info, format!("event of {job}"));
        inserted.push(f.store.insert_event(&event).await.unwrap());
    }
    let foreign = PageRequest {
        after: Some(inserted[1].id.to_string()),
        limit: 10,
    };

    let result = f.store.list_events(&id, &foreign).await;

    let Err(err) = result else {
        panic!("a page after an event of another job was listed: {result:?}");
    };
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

pub async fn events_page_newest_first(f: &Fixture) {
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

/// Inserts `count` message events `{prefix} 0`, `{prefix} 1`, … for `job_id`.
async fn insert_messages(f: &Fixture, job_id: &JobId, prefix: &str, count: usize) -> Vec<EventId> {
    let mut ids = Vec::new();
    for n in 0..count {
        let message = format!("{prefix} {n}");
        let event = NewEvent::message(job_id, EventLevel::Info, message);
        ids.push(f.store.insert_event(&event).await.unwrap().id);
    }
    ids
}

fn event_messages(events: &[EventRecord]) -> Vec<&str> {
    events.iter().map(|event| event.message.as_str()).collect()
}

pub async fn events_since_list_oldest_first(f: &Fixture) {
    let id = f.queue_job().await;
    let other = f.queue_job().await;
    let mut ids = insert_messages(f, &id, "event", 3).await;
    insert_messages(f, &other, "other", 2).await;
    ids.extend(insert_messages(f, &id, "later", 2).await);

    let all = f.store.list_events_since(&id, None, 100).await.unwrap();
    let first_two = f.store.list_events_since(&id, None, 2).await.unwrap();
    let after_second = f
        .store
        .list_events_since(&id, Some(&ids[1]), 2)
        .await
        .unwrap();
    let after_last = f
        .store
        .list_events_since(&id, Some(&ids[4]), 100)
        .await
        .unwrap();

    assert_eq!(
        event_messages(&all),
        ["event 0", "event 1", "event 2", "later 0", "later 1"]
    );
    assert_eq!(all.iter().map(|e| &e.id).collect::<Vec<_>>(), ids.iter().collect::<Vec<_>>());
    assert_eq!(event_messages(&first_two), ["event 0", "event 1"]);
    assert_eq!(event_messages(&after_second), ["event 2", "later 0"]);
    assert!(after_last.is_empty(), "{after_last:?}");
}

pub async fn events_since_unknown_or_foreign_id_is_not_found(f: &Fixture) {
    let id = f.queue_job().await;
    let other = f.queue_job().await;
    insert_messages(f, &id, "event", 1).await;
    let foreign = insert_messages(f, &other, "other", 1).await;

    let unknown = f
        .store
        .list_events_since(&id, Some(&EventId::new()), 10)
        .await
        .unwrap_err();
    let of_other_job = f
        .store
        .list_events_since(&id, Some(&foreign[0]), 10)
        .await
        .unwrap_err();

    assert!(matches!(unknown, StoreError::NotFound { .. }), "{unknown:?}");
    assert!(
        matches!(of_other_job, StoreError::NotFound { .. }),
        "{of_other_job:?}"
    );
}

/// A reader that continues after the last event it read gets every event exactly once, even
/// while concurrent writers insert: events must become visible in the order of their `seq`.
pub async fn concurrent_event_inserts_leave_no_gaps(f: &Fixture) {
    const WRITERS: usize = 8;
    const EVENTS_PER_WRITER: usize = 15;
    let id = f.queue_job().await;

    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let store = f.store.clone();
        let id = id.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..EVENTS_PER_WRITER {
                let event = NewEvent::message(&id, EventLevel::Info, format!("w{writer} {n}"));
                store.insert_event(&event).await.unwrap();
            }
        }));
    }
    let mut read = Vec::new();
    let mut last: Option<EventId> = None;
    let mut writers_done = false;
    loop {
        let batch = f
            .store
            .list_events_since(&id, last.as_ref(), 4)
            .await
            .unwrap();
        if let Some(event) = batch.last() {
            last = Some(event.id.clone());
        }
        let caught_up = batch.is_empty();
        read.extend(batch);
        if caught_up && writers_done {
            break;
        }
        if caught_up {
            writers_done = writers.iter().all(|writer| writer.is_finished());
            tokio::task::yield_now().await;
        }
    }
    for writer in writers {
        writer.await.unwrap();
    }

    let all = f.store.list_events_since(&id, None, 1000).await.unwrap();
    let read_ids: Vec<&EventId> = read.iter().map(|event| &event.id).collect();
    let all_ids: Vec<&EventId> = all.iter().map(|event| &event.id).collect();
    assert_eq!(all.len(), WRITERS * EVENTS_PER_WRITER);
    assert_eq!(read_ids, all_ids, "the reader skipped or repeated events");
}

pub async fn event_insert_wakes_subscriber(f: &Fixture) {
    let id = f.queue_job().await;
    let other = f.queue_job().await;
    let mut subscription = f.store.subscribe_events().await.unwrap();

    insert_messages(f, &other, "other", 1).await;
    insert_messages(f, &id, "event", 1).await;
    let first = timeout(WAKE_TIMEOUT, subscription.recv()).await;
    let second = timeout(WAKE_TIMEOUT, subscription.recv()).await;
    insert_messages(f, &other, "other", 1).await;
    insert_messages(f, &id, "event", 1).await;
    let woken = timeout(WAKE_TIMEOUT, subscription.wait_for_job(&id)).await;

    assert_eq!(first, Ok(Some(EventNotice::Inserted(other.clone()))));
    assert_eq!(second, Ok(Some(EventNotice::Inserted(id.clone()))));
    assert_eq!(woken, Ok(true));
}

pub async fn metrics_list_by_step_and_overwrite(f: &Fixture) {
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

pub async fn metrics_of_lost_job_are_rejected(f: &Fixture) {
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

pub async fn metrics_keep_token_accuracy(f: &Fixture) {
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

pub async fn metrics_keep_dpo_rewards(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap();
    let rewards = studio_store::RewardMetrics {
        reward_chosen: 0.25,
        reward_rejected: -0.5,
        reward_accuracy: 0.75,
        reward_margin: 0.75,
    };
    let mut dpo = point(1);
    dpo.rewards = Some(rewards);

    f.store.insert_metrics(&id, "w1", &[dpo, point(2)]).await.unwrap();
    let points = f.store.list_metrics(&id).await.unwrap();

    assert_eq!(points[0].rewards, Some(rewards));
    assert_eq!(points[1].rewards, None);
}

pub fn checkpoint(job_id: &JobId, step: u64) -> NewCheckpoint {
    NewCheckpoint {
        id: CheckpointId::new(),
        job_id: job_id.clone(),
        step,
        metrics: json!({"step": step, "train_loss": 1.0 / step as f64}),
        artifact_key: format!("jobs/{job_id}/checkpoints/step-{step}"),
    }
}

pub async fn checkpoints_list_latest_step_first(f: &Fixture) {
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

pub async fn checkpoint_of_same_step_is_replaced(f: &Fixture) {
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

pub async fn checkpoint_of_lost_job_is_rejected(f: &Fixture) {
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

pub async fn checkpoint_of_other_job_is_not_found(f: &Fixture) {
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

pub async fn files_page_and_get(f: &Fixture) {

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

pub async fn claim_skips_running_and_cancelled_jobs(f: &Fixture) {
    let running = f.queue_job().await;
    let cancelled = f.queue_job().await;
    let queued = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap().unwrap();
    f.store.request_cancel(&cancelled).await.unwrap();

    let next = f.store.claim_job("w2", LEASE).await.unwrap().unwrap();
    let none = f.store.claim_job("w3", LEASE).await.unwrap();
    let first = f.store.get_job(&running).await.unwrap();

    assert_eq!(next.id, queued);
    assert!(none.is_none(), "{none:?}");
    assert_eq!(first.locked_by.as_deref(), Some("w1"));
}

pub async fn worker_that_lost_job_cannot_change_it(f: &Fixture) {
    let id = f.queue_job().await;
    f.hand_job_to_second_worker(&id).await;
    let error = JobError {
        code: "server_error".into(),
        message: "boom".into(),
        param: None,
    };

    let heartbeat = f.store.heartbeat(&id, "w1", LEASE).await.unwrap_err();
    let fail = f.store.fail_job(&id, "w1", &error).await.unwrap_err();
    let cancel = f.store.cancel_running_job(&id, "w1").await.unwrap_err();
    let release = f.store.release_job(&id, "w1").await.unwrap_err();
    let metrics = f.store.insert_metrics(&id, "w1", &[point(1)]).await.unwrap_err();
    let checkpoint = f
        .store
        .insert_checkpoint("w1", &checkpoint(&id, 1))
        .await
        .unwrap_err();
    let job = f.store.get_job(&id).await.unwrap();

    for err in [heartbeat, fail, cancel, release, metrics, checkpoint] {
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!(job.locked_by.as_deref(), Some("w2"));
    assert_eq!(job.attempt, 2);
    assert!(f.store.list_metrics(&id).await.unwrap().is_empty());
}

pub async fn rescue_requeues_and_counts_attempt(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap().unwrap();
    f.clock.advance(TimeDelta::seconds(31));

    let rescued = f.store.rescue_expired_jobs().await.unwrap();
    let job = f.store.get_job(&id).await.unwrap();

    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].id, id);
    assert_eq!(rescued[0].status, JobStatus::Queued);
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 1);
    assert_eq!(job.locked_by, None);
    assert_eq!(job.lease_expires_at, None);
    assert_eq!(job.finished_at, None);
}

pub async fn rescue_cancels_job_with_cancel_request(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap().unwrap();
    f.store.request_cancel(&id).await.unwrap();
    f.clock.advance(TimeDelta::seconds(31));

    let rescued = f.store.rescue_expired_jobs().await.unwrap();
    let job = f.store.get_job(&id).await.unwrap();

    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].status, JobStatus::Cancelled);
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.finished_at, Some(f.clock.now()));
    assert_eq!(job.error, None);
}

pub async fn cancel_of_running_job_is_requested(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap().unwrap();

    let outcome = f.store.request_cancel(&id).await.unwrap();

    let CancelOutcome::Requested(job) = outcome else {
        panic!("expected Requested, got {outcome:?}")
    };
    assert_eq!(job.status, JobStatus::Running);
    assert!(job.cancel_requested);
    assert_eq!(job.finished_at, None);
    assert_eq!(job.locked_by.as_deref(), Some("w1"));
}

pub async fn cancel_running_job_sets_cancelled(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.claim_job("w1", LEASE).await.unwrap().unwrap();
    f.store.request_cancel(&id).await.unwrap();

    let job = f.store.cancel_running_job(&id, "w1").await.unwrap();

    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.finished_at, Some(f.clock.now()));
    assert_eq!(job.locked_by, None);
    assert_eq!(job.lease_expires_at, None);
}

pub async fn succeeded_jobs_list_newest_first(f: &Fixture) {
    let older = f.queue_job().await;
    let newer = f.queue_job().await;
    f.queue_job().await;
    for (worker, model) in [("w1", "ft:tiny:a"), ("w2", "ft:tiny:b")] {
        let job = f.store.claim_job(worker, LEASE).await.unwrap().unwrap();
        f.store.complete_job(&job.id, worker, model, 1).await.unwrap();
    }

    let succeeded = f.store.list_succeeded_jobs().await.unwrap();

    let ids = succeeded.iter().map(|job| job.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids, [newer, older]);
}

pub async fn event_keeps_level_type_and_data(f: &Fixture) {
    let id = f.queue_job().await;
    let event = NewEvent {
        job_id: id.clone(),
        level: EventLevel::Warn,
        event_type: studio_store::EventType::Metrics,
        message: "step 1".into(),
        data: Some(json!({"step": 1, "train_loss": 0.5})),
    };

    let saved = f.store.insert_event(&event).await.unwrap();
    let listed = f.store.list_events(&id, &PageRequest::first(10)).await.unwrap();

    assert_eq!(saved.level, EventLevel::Warn);
    assert_eq!(saved.event_type, studio_store::EventType::Metrics);
    assert_eq!(saved.data, event.data);
    assert_eq!(saved.created_at, f.clock.now());
    assert_eq!(listed.data, vec![saved]);
}

pub async fn duplicate_file_id_is_conflict(f: &Fixture) {
    let err = f.store.insert_file(&new_file(&f.file)).await.unwrap_err();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

/// Builds an upload of new content `sha256` with the idempotency key `key`.
fn keyed_file(key: &str, sha256: &str) -> NewFile {
    NewFile {
        sha256: sha256.into(),
        idempotency_key: Some(key.into()),
        ..new_file(&FileId::new())
    }
}

pub async fn idempotent_file_insert_returns_first_file(f: &Fixture) {
    let first_upload = keyed_file("upload-1", &"a".repeat(64));
    let repeat = keyed_file("upload-1", &"a".repeat(64));

    let first = f.store.insert_file(&first_upload).await.unwrap();
    f.clock.advance(TimeDelta::seconds(1));
    let again = f.store.insert_file(&repeat).await.unwrap();
    let missing = f.store.get_file(&repeat.id).await.unwrap_err();
    let files = f.store.list_files(&PageRequest::first(10)).await.unwrap();

    assert_eq!(first.id, first_upload.id);
    assert_eq!(again, first);
    assert!(matches!(missing, StoreError::NotFound { .. }), "{missing:?}");
    // The fixture's file and the keyed one.
    assert_eq!(files.data.len(), 2);
}

pub async fn idempotent_file_insert_with_other_content_conflicts(f: &Fixture) {
    let first = f.store.insert_file(&keyed_file("upload-2", &"a".repeat(64))).await.unwrap();
    let renamed = NewFile {
        filename: "other.jsonl".into(),
        ..keyed_file("upload-2", &"a".repeat(64))
    };

    let other_content = f.store.insert_file(&keyed_file("upload-2", &"b".repeat(64))).await.unwrap_err();
    let other_name = f.store.insert_file(&renamed).await.unwrap_err();
    let files = f.store.list_files(&PageRequest::first(10)).await.unwrap();

    for err in [&other_content, &other_name] {
        let StoreError::Conflict(message) = err else {
            panic!("expected a conflict, got {err:?}");
        };
        assert!(message.contains("upload-2"), "{message}");
        assert!(message.contains(first.id.as_str()), "{message}");
    }
    assert_eq!(files.data.len(), 2);
}

pub async fn concurrent_idempotent_file_inserts_store_one_file(f: &Fixture) {
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = f.store.clone();
        let file = keyed_file("upload-race", &"c".repeat(64));
        tasks.push(tokio::spawn(async move { store.insert_file(&file).await }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap().id);
    }
    let files = f.store.list_files(&PageRequest::first(20)).await.unwrap();

    ids.dedup();
    assert_eq!(ids.len(), 1, "every upload returns the one stored file");
    assert_eq!(files.data.len(), 2);
}

pub async fn job_with_unknown_file_is_conflict(f: &Fixture) {
    let body = json!({"model": "tiny", "training_file": FileId::new().as_str()});
    let job = NewJob {
        id: JobId::new(),
        spec: JobSpec::parse(&body, 1).unwrap(),
        max_attempts: 2,
        idempotency_key: None,
        request_hash: None,
    };

    let err = f.store.insert_job(&job).await.unwrap_err();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}
