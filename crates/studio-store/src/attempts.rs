//! The rules for a running job whose attempt ended without finishing it, because its worker was
//! lost (the lease expired) or hit a transient failure. Both backends apply them.

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use studio_core::{JobId, JobStatus};

use crate::records::JobError;
use crate::retry::retry_delay;

/// The columns of a running job that decide where it goes when its attempt ends.
#[derive(Clone, Debug)]
pub(crate) struct EndingAttempt {
    pub id: JobId,
    /// The attempt that ended, 1-based: claims count attempts.
    pub attempt: u32,
    pub max_attempts: u32,
    pub cancel_requested: bool,
    pub pause_requested: bool,
}

/// The new state of a job whose attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AttemptOutcome {
    pub status: JobStatus,
    /// Set when `status` is terminal.
    pub finished_at: Option<DateTime<Utc>>,
    /// The job's `error`, set when it failed.
    pub error: Option<JobError>,
    /// The attempt's own error, kept whatever the new status.
    pub last_error: JobError,
    /// Set when the job goes back to the queue.
    pub run_after: Option<DateTime<Utc>>,
}

/// Decides the new state of `job` after its attempt ended with `error` at `now`. The first rule
/// that applies wins. A requested cancel cancels the job. A job out of attempts fails with an
/// error that names the attempts and `error`'s message. A requested pause pauses the job.
/// Anything else is requeued after [`retry_delay`].
pub(crate) fn end_attempt(
    job: &EndingAttempt,
    error: JobError,
    now: DateTime<Utc>,
) -> AttemptOutcome {
    let (status, job_error, run_after) = if job.cancel_requested {
        (JobStatus::Cancelled, None, None)
    } else if job.attempt >= job.max_attempts {
        (JobStatus::Failed, Some(out_of_attempts(job, &error)), None)
    } else if job.pause_requested {
        (JobStatus::Paused, None, None)
    } else {
        let delay = TimeDelta::from_std(retry_delay(&job.id, job.attempt))
            .expect("retry_delay is at most 10 minutes");
        (JobStatus::Queued, None, Some(now + delay))
    };
    AttemptOutcome {
        status,
        finished_at: status.is_terminal().then_some(now),
        error: job_error,
        last_error: error,
        run_after,
    }
}

/// Builds the error recorded when the worker that owned a job stopped extending its lease.
pub(crate) fn worker_lost(worker_id: &str, lease_expired_at: DateTime<Utc>) -> JobError {
    JobError {
        code: "worker_lost".into(),
        message: format!(
            "worker {worker_id} stopped sending heartbeats (lease expired at {})",
            lease_expired_at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        ),
        param: None,
    }
}

/// Builds the `error` of a job whose last attempt ended with `last`: the same code and param,
/// and a message stating that the job ran out of attempts.
fn out_of_attempts(job: &EndingAttempt, last: &JobError) -> JobError {
    JobError {
        code: last.code.clone(),
        message: format!(
            "the job ran out of attempts ({} of {}); the last one ended with: {}",
            job.attempt, job.max_attempts, last.message
        ),
        param: last.param.clone(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn running(attempt: u32) -> EndingAttempt {
        EndingAttempt {
            id: JobId::new(),
            attempt,
            max_attempts: 3,
            cancel_requested: false,
            pause_requested: false,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
    }

    fn transient() -> JobError {
        JobError {
            code: "server_error".into(),
            message: "the artifact store timed out".into(),
            param: None,
        }
    }

    #[test]
    fn attempt_left_requeues_after_backoff() {
        let job = running(2);

        let outcome = end_attempt(&job, transient(), now());

        let delay = TimeDelta::from_std(retry_delay(&job.id, 2)).unwrap();
        assert_eq!(outcome.status, JobStatus::Queued);
        assert_eq!(outcome.run_after, Some(now() + delay));
        assert_eq!(outcome.finished_at, None);
        assert_eq!(outcome.error, None);
        assert_eq!(outcome.last_error, transient());
    }

    #[test]
    fn last_attempt_fails_with_last_message() {
        let outcome = end_attempt(&running(3), transient(), now());

        let error = outcome.error.unwrap();
        assert_eq!(outcome.status, JobStatus::Failed);
        assert_eq!(outcome.finished_at, Some(now()));
        assert_eq!(outcome.run_after, None);
        assert_eq!(error.code, "server_error");
        assert!(
            error.message.contains("ran out of attempts (3 of 3)"),
            "{}",
            error.message
        );
        assert!(
            error.message.contains("the artifact store timed out"),
            "{}",
            error.message
        );
    }

    #[test]
    fn cancel_wins_over_pause_and_attempts() {
        let mut job = running(3);
        job.cancel_requested = true;
        job.pause_requested = true;

        let outcome = end_attempt(&job, transient(), now());

        assert_eq!(outcome.status, JobStatus::Cancelled);
        assert_eq!(outcome.error, None);
    }

    #[test]
    fn pause_request_pauses_without_backoff() {
        let mut job = running(1);
        job.pause_requested = true;

        let outcome = end_attempt(&job, transient(), now());

        assert_eq!(outcome.status, JobStatus::Paused);
        assert_eq!(outcome.run_after, None);
        assert_eq!(outcome.finished_at, None);
    }

    #[test]
    fn worker_lost_names_worker_and_expiry() {
        let error = worker_lost("w7", now());

        assert_eq!(error.code, "worker_lost");
        assert_eq!(
            error.message,
            "worker w7 stopped sending heartbeats (lease expired at 2025-01-01T00:00:00Z)"
        );
    }
}
