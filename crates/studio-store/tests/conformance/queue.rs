//! Cases of the queue controls: retry backoff after a failed attempt, the kept `last_error`,
//! pause and resume, and idempotent inserts. `suite` re-exports them for `conformance_cases!`.

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::json;
use studio_core::{JobId, JobSpec, JobStatus};
use studio_store::{
    retry_delay, CancelOutcome, Clock, JobError, JobRecord, NewJob, PageRequest, PauseOutcome,
    StoreError,
};

use crate::suite::{Fixture, LEASE};

/// The lease of a job claimed with [`LEASE`] has expired this long after the claim.
const PAST_LEASE: TimeDelta = TimeDelta::seconds(31);

fn transient_error() -> JobError {
    JobError {
        code: "server_error".into(),
        message: "uploading the checkpoint timed out".into(),
        param: None,
    }
}

fn backoff(id: &JobId, attempt: u32) -> TimeDelta {
    TimeDelta::from_std(retry_delay(id, attempt)).unwrap()
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn assert_conflict_names(err: &StoreError, words: &[&str]) {
    let StoreError::Conflict(message) = err else {
        panic!("expected a conflict, got {err:?}");
    };
    for word in words {
        assert!(message.contains(word), "{message:?} does not name {word:?}");
    }
}

impl Fixture {
    /// Builds a job on the fixture's file with an idempotency key and request hash.
    fn keyed_job(&self, key: &str, request_hash: &str) -> NewJob {
        let body = json!({"model": "tiny", "training_file": self.file.as_str()});
        NewJob {
            id: JobId::new(),
            spec: JobSpec::parse(&body, 1).unwrap(),
            max_attempts: 2,
            idempotency_key: Some(key.into()),
            request_hash: Some(request_hash.into()),
        }
    }

    /// Claims the oldest claimable job for `worker`, which must exist.
    async fn claim(&self, worker: &str) -> JobRecord {
        self.store.claim_job(worker, LEASE).await.unwrap().unwrap()
    }

    /// Lets the lease of the running jobs expire and rescues them.
    async fn expire_and_rescue(&self) {
        self.clock.advance(PAST_LEASE);
        self.store.rescue_expired_jobs().await.unwrap();
    }

    /// Moves the clock to `run_after` of job `id`, which must be set.
    async fn advance_to_run_after(&self, id: &JobId) {
        let job = self.store.get_job(id).await.unwrap();
        let run_after = job.run_after.expect("the job has no run_after");
        self.clock.advance(run_after - self.clock.now());
    }
}

pub async fn rescued_job_waits_for_backoff(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.clock.advance(PAST_LEASE);

    f.store.rescue_expired_jobs().await.unwrap();
    let rescued = f.store.get_job(&id).await.unwrap();
    let run_after = f.clock.now() + backoff(&id, 1);
    let too_early = f.store.claim_job("w2", LEASE).await.unwrap();
    f.clock
        .advance(run_after - f.clock.now() - TimeDelta::milliseconds(1));
    let still_early = f.store.claim_job("w2", LEASE).await.unwrap();
    f.clock.advance(TimeDelta::milliseconds(1));
    let claimed = f.store.claim_job("w2", LEASE).await.unwrap();

    assert_eq!(rescued.status, JobStatus::Queued);
    assert_eq!(rescued.run_after, Some(run_after));
    assert!(
        too_early.is_none(),
        "claimed before run_after: {too_early:?}"
    );
    assert!(
        still_early.is_none(),
        "claimed before run_after: {still_early:?}"
    );
    let claimed = claimed.expect("the job is claimable once run_after has come");
    assert_eq!(claimed.id, id);
    assert_eq!(claimed.attempt, 2);
    assert_eq!(claimed.run_after, None);
}

pub async fn backoff_lets_later_job_be_claimed(f: &Fixture) {
    let rescued = f.queue_job().await;
    f.claim("w1").await;
    f.expire_and_rescue().await;
    let fresh = f.queue_job().await;

    let claimed = f.claim("w2").await;

    assert_eq!(
        claimed.id, fresh,
        "the older job {rescued} is still backing off"
    );
}

pub async fn rescue_records_worker_lost(f: &Fixture) {
    let id = f.queue_job().await;
    let claimed = f.claim("w1").await;
    let expired_at = claimed.lease_expires_at.unwrap();

    f.expire_and_rescue().await;
    let job = f.store.get_job(&id).await.unwrap();

    let last_error = job.last_error.expect("rescue keeps the last error");
    assert_eq!(last_error.code, "worker_lost");
    assert_eq!(
        last_error.message,
        format!(
            "worker w1 stopped sending heartbeats (lease expired at {})",
            rfc3339(expired_at)
        )
    );
    assert_eq!(job.error, None, "a requeued job has no error yet");
}

pub async fn out_of_attempts_keeps_last_error(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.expire_and_rescue().await;
    f.advance_to_run_after(&id).await;
    let second = f.claim("w2").await;

    f.expire_and_rescue().await;
    let job = f.store.get_job(&id).await.unwrap();
    let claimed = f.store.claim_job("w3", LEASE).await.unwrap();

    let last_message = format!(
        "worker w2 stopped sending heartbeats (lease expired at {})",
        rfc3339(second.lease_expires_at.unwrap())
    );
    let error = job.error.expect("a failed job has an error");
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.finished_at, Some(f.clock.now()));
    assert_eq!(job.run_after, None);
    assert_eq!(error.code, "worker_lost");
    assert!(
        error.message.contains("ran out of attempts (2 of 2)"),
        "{}",
        error.message
    );
    assert!(error.message.contains(&last_message), "{}", error.message);
    assert_eq!(job.last_error.unwrap().message, last_message);
    assert!(
        claimed.is_none(),
        "a failed job must not be claimed: {claimed:?}"
    );
}

pub async fn requeue_backs_off_and_keeps_error(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;

    let job = f
        .store
        .requeue_job(&id, "w1", &transient_error())
        .await
        .unwrap();
    let claimed = f.store.claim_job("w2", LEASE).await.unwrap();

    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 1);
    assert_eq!(job.locked_by, None);
    assert_eq!(job.lease_expires_at, None);
    assert_eq!(job.run_after, Some(f.clock.now() + backoff(&id, 1)));
    assert_eq!(job.last_error, Some(transient_error()));
    assert_eq!(job.error, None);
    assert!(claimed.is_none(), "claimed during the backoff: {claimed:?}");
}

pub async fn requeue_on_last_attempt_fails(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store
        .requeue_job(&id, "w1", &transient_error())
        .await
        .unwrap();
    f.advance_to_run_after(&id).await;
    f.claim("w2").await;

    let job = f
        .store
        .requeue_job(&id, "w2", &transient_error())
        .await
        .unwrap();

    let error = job.error.expect("a failed job has an error");
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.finished_at, Some(f.clock.now()));
    assert_eq!(job.run_after, None);
    assert_eq!(job.locked_by, None);
    assert_eq!(error.code, "server_error");
    assert!(
        error.message.contains("ran out of attempts (2 of 2)"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("uploading the checkpoint timed out"),
        "{}",
        error.message
    );
    assert_eq!(job.last_error, Some(transient_error()));
}

pub async fn requeue_by_other_worker_is_conflict(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;

    let err = f
        .store
        .requeue_job(&id, "w2", &transient_error())
        .await
        .unwrap_err();
    let job = f.store.get_job(&id).await.unwrap();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(job.status, JobStatus::Running);
    assert_eq!(job.locked_by.as_deref(), Some("w1"));
    assert_eq!(job.last_error, None);
}

pub async fn pause_of_queued_job_is_immediate(f: &Fixture) {
    let id = f.queue_job().await;

    let outcome = f.store.request_pause(&id).await.unwrap();
    let claimed = f.store.claim_job("w1", LEASE).await.unwrap();

    let PauseOutcome::Paused(job) = outcome else {
        panic!("expected Paused, got {outcome:?}")
    };
    assert_eq!(job.status, JobStatus::Paused);
    assert!(!job.pause_requested);
    assert_eq!(job.finished_at, None);
    assert!(
        claimed.is_none(),
        "a paused job must not be claimed: {claimed:?}"
    );
}

pub async fn pause_of_running_job_is_requested(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;

    let outcome = f.store.request_pause(&id).await.unwrap();
    let again = f.store.request_pause(&id).await.unwrap();

    let PauseOutcome::Requested(job) = outcome else {
        panic!("expected Requested, got {outcome:?}")
    };
    assert_eq!(job.status, JobStatus::Running);
    assert!(job.pause_requested);
    assert_eq!(job.locked_by.as_deref(), Some("w1"));
    assert!(matches!(again, PauseOutcome::Requested(_)), "{again:?}");
}

pub async fn heartbeat_reports_pause_request(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    let before = f.store.heartbeat(&id, "w1", LEASE).await.unwrap();

    f.store.request_pause(&id).await.unwrap();
    let after = f.store.heartbeat(&id, "w1", LEASE).await.unwrap();

    assert!(!before.pause_requested);
    assert!(after.pause_requested);
    assert!(!after.cancel_requested);
}

pub async fn pause_of_paused_job_changes_nothing(f: &Fixture) {
    let id = f.queue_job().await;
    let PauseOutcome::Paused(paused) = f.store.request_pause(&id).await.unwrap() else {
        panic!("the queued job was not paused at once");
    };
    f.clock.advance(TimeDelta::seconds(5));

    let outcome = f.store.request_pause(&id).await.unwrap();

    assert_eq!(outcome, PauseOutcome::AlreadyPaused(paused));
}

pub async fn pause_of_finished_job_is_conflict(f: &Fixture) {
    let cancelled = f.queue_job().await;
    let succeeded = f.queue_job().await;
    f.store.request_cancel(&cancelled).await.unwrap();
    f.claim("w1").await;
    f.store
        .complete_job(&succeeded, "w1", "ft:tiny:x", 1)
        .await
        .unwrap();

    let cancelled_err = f.store.request_pause(&cancelled).await.unwrap_err();
    let succeeded_err = f.store.request_pause(&succeeded).await.unwrap_err();
    let unknown_err = f.store.request_pause(&JobId::new()).await.unwrap_err();

    assert_conflict_names(&cancelled_err, &[cancelled.as_str(), "cancelled"]);
    assert_conflict_names(&succeeded_err, &[succeeded.as_str(), "succeeded"]);
    assert!(
        matches!(unknown_err, StoreError::NotFound { .. }),
        "{unknown_err:?}"
    );
}

pub async fn pause_after_cancel_request_is_conflict(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store.request_cancel(&id).await.unwrap();

    let err = f.store.request_pause(&id).await.unwrap_err();
    let job = f.store.get_job(&id).await.unwrap();

    assert_conflict_names(&err, &["cancel"]);
    assert!(!job.pause_requested);
}

pub async fn pause_running_job_by_owner_only(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store.request_pause(&id).await.unwrap();

    let err = f.store.pause_running_job(&id, "w2").await.unwrap_err();
    let job = f.store.pause_running_job(&id, "w1").await.unwrap();

    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(job.status, JobStatus::Paused);
    assert_eq!(job.locked_by, None);
    assert_eq!(job.lease_expires_at, None);
    assert!(!job.pause_requested);
    assert_eq!(job.attempt, 0, "a paused attempt does not count");
    assert_eq!(job.finished_at, None);
}

pub async fn resume_queues_paused_job(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store.request_pause(&id).await.unwrap();
    f.store.pause_running_job(&id, "w1").await.unwrap();

    let job = f.store.resume_job(&id).await.unwrap();
    let claimed = f.claim("w2").await;

    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.run_after, None);
    assert_eq!(claimed.id, id);
    assert_eq!(claimed.attempt, 1);
}

pub async fn resume_clears_backoff(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store
        .requeue_job(&id, "w1", &transient_error())
        .await
        .unwrap();

    f.store.request_pause(&id).await.unwrap();
    let resumed = f.store.resume_job(&id).await.unwrap();
    let claimed = f.claim("w2").await;

    assert_eq!(resumed.run_after, None);
    assert_eq!(claimed.id, id);
}

pub async fn resume_of_unpaused_job_is_conflict(f: &Fixture) {
    let queued = f.queue_job().await;
    let cancelled = f.queue_job().await;
    f.store.request_cancel(&cancelled).await.unwrap();

    let queued_err = f.store.resume_job(&queued).await.unwrap_err();
    let cancelled_err = f.store.resume_job(&cancelled).await.unwrap_err();
    let unknown_err = f.store.resume_job(&JobId::new()).await.unwrap_err();

    assert_conflict_names(&queued_err, &[queued.as_str(), "queued"]);
    assert_conflict_names(&cancelled_err, &[cancelled.as_str(), "cancelled"]);
    assert!(
        matches!(unknown_err, StoreError::NotFound { .. }),
        "{unknown_err:?}"
    );
}

pub async fn rescue_pauses_job_with_pause_request(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store.request_pause(&id).await.unwrap();

    f.clock.advance(PAST_LEASE);
    let rescued = f.store.rescue_expired_jobs().await.unwrap();
    let job = f.store.get_job(&id).await.unwrap();
    let claimed = f.store.claim_job("w2", LEASE).await.unwrap();

    assert_eq!(rescued.len(), 1);
    assert_eq!(rescued[0].status, JobStatus::Paused);
    assert_eq!(job.status, JobStatus::Paused);
    assert_eq!(job.locked_by, None);
    assert_eq!(job.run_after, None);
    assert!(!job.pause_requested);
    assert_eq!(job.last_error.unwrap().code, "worker_lost");
    assert!(
        claimed.is_none(),
        "a paused job must not be claimed: {claimed:?}"
    );
}

pub async fn release_of_pause_requested_job_pauses_it(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store.request_pause(&id).await.unwrap();

    let job = f.store.release_job(&id, "w1").await.unwrap();

    assert_eq!(job.status, JobStatus::Paused);
    assert!(!job.pause_requested);
    assert_eq!(job.attempt, 0);
}

pub async fn pause_running_job_after_cancel_request_cancels(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store.request_pause(&id).await.unwrap();
    // The cancel comes after the worker's last heartbeat, which reported only the pause.
    f.store.request_cancel(&id).await.unwrap();

    let job = f.store.pause_running_job(&id, "w1").await.unwrap();
    let resumed = f.store.resume_job(&id).await;

    assert_eq!(job.status, JobStatus::Cancelled, "a requested cancel wins over the pause");
    assert_eq!(job.finished_at, Some(f.clock.now()));
    assert_eq!(job.locked_by, None);
    assert!(!job.pause_requested);
    assert!(resumed.is_err(), "a cancelled job must not be resumed: {resumed:?}");
}

pub async fn release_of_cancel_requested_job_cancels_it(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.store.request_cancel(&id).await.unwrap();

    let job = f.store.release_job(&id, "w1").await.unwrap();
    let claimed = f.store.claim_job("w2", LEASE).await.unwrap();

    assert_eq!(job.status, JobStatus::Cancelled, "a requested cancel wins over the release");
    assert_eq!(job.finished_at, Some(f.clock.now()));
    assert_eq!(job.locked_by, None);
    assert!(claimed.is_none(), "a cancelled job must not be claimed: {claimed:?}");
}

pub async fn cancel_of_paused_job_is_immediate(f: &Fixture) {
    let id = f.queue_job().await;
    f.store.request_pause(&id).await.unwrap();

    let outcome = f.store.request_cancel(&id).await.unwrap();

    let CancelOutcome::Cancelled(job) = outcome else {
        panic!("expected Cancelled, got {outcome:?}")
    };
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.finished_at, Some(f.clock.now()));
}

pub async fn cancel_of_backing_off_job_is_immediate(f: &Fixture) {
    let id = f.queue_job().await;
    f.claim("w1").await;
    f.expire_and_rescue().await;

    let outcome = f.store.request_cancel(&id).await.unwrap();

    let CancelOutcome::Cancelled(job) = outcome else {
        panic!("expected Cancelled, got {outcome:?}")
    };
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.run_after, None);
}

pub async fn idempotent_insert_returns_first_job(f: &Fixture) {
    let first_request = f.keyed_job("create-1", "hash-a");
    let repeat = f.keyed_job("create-1", "hash-a");

    let first = f.store.insert_job(&first_request).await.unwrap();
    f.clock.advance(TimeDelta::seconds(1));
    let again = f.store.insert_job(&repeat).await.unwrap();
    let jobs = f.store.list_jobs(&PageRequest::first(10)).await.unwrap();

    assert_eq!(first.id, first_request.id);
    assert_eq!(first.idempotency_key.as_deref(), Some("create-1"));
    assert_eq!(again, first);
    assert_eq!(jobs.data.len(), 1);
}

pub async fn idempotent_insert_with_other_body_conflicts(f: &Fixture) {
    let first = f
        .store
        .insert_job(&f.keyed_job("create-2", "hash-a"))
        .await
        .unwrap();

    let err = f
        .store
        .insert_job(&f.keyed_job("create-2", "hash-b"))
        .await
        .unwrap_err();
    let jobs = f.store.list_jobs(&PageRequest::first(10)).await.unwrap();

    assert_conflict_names(
        &err,
        &["create-2", first.id.as_str(), "different request body"],
    );
    assert_eq!(jobs.data.len(), 1);
}

pub async fn jobs_without_key_are_independent(f: &Fixture) {
    f.queue_job().await;
    f.queue_job().await;
    f.store
        .insert_job(&f.keyed_job("create-3", "hash-a"))
        .await
        .unwrap();
    f.store
        .insert_job(&f.keyed_job("create-4", "hash-a"))
        .await
        .unwrap();

    let jobs = f.store.list_jobs(&PageRequest::first(10)).await.unwrap();

    assert_eq!(jobs.data.len(), 4);
}

pub async fn concurrent_idempotent_inserts_store_one_job(f: &Fixture) {
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = f.store.clone();
        let job = f.keyed_job("create-race", "hash-a");
        tasks.push(tokio::spawn(async move { store.insert_job(&job).await }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap().unwrap().id);
    }
    let jobs = f.store.list_jobs(&PageRequest::first(20)).await.unwrap();

    assert_eq!(jobs.data.len(), 1, "one key must store one job");
    for id in ids {
        assert_eq!(id, jobs.data[0].id);
    }
}
