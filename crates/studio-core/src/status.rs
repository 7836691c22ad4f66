//! The job status machine, with OpenAI's status names plus `paused`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Paused,
    Succeeded,
    Failed,
    Cancelled,
}

/// A status string that is not one of [`JobStatus::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status {0:?}")]
pub struct UnknownStatus(pub String);

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::ValidatingFiles,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Paused,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Terminal states are final: no transition leaves them, and `finished_at` is set exactly
    /// in them.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Checks whether the status machine allows going from `self` to `next`.
    ///
    /// `running → queued` is the rescue of a job whose worker lost its lease or shut down;
    /// `paused → queued` is resume.
    pub fn can_transition_to(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (ValidatingFiles, Queued | Failed | Cancelled)
                | (Queued, Running | Cancelled | Failed | Paused)
                | (Running, Succeeded | Failed | Cancelled | Paused | Queued)
                | (Paused, Queued | Cancelled)
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobStatus::ALL {
                assert!(
                    !from.can_transition_to(to),
                    "{from} -> {to} must be illegal"
                );
            }
        }
    }

    #[test]
    fn queued_job_cannot_succeed_without_running() {
        assert!(!JobStatus::Queued.can_transition_to(JobStatus::Succeeded));
        assert!(JobStatus::Queued.can_transition_to(JobStatus::Running));
        assert!(JobStatus::Running.can_transition_to(JobStatus::Succeeded));
    }

    #[test]
    fn paused_job_resumes_through_the_queue() {
        assert!(JobStatus::Queued.can_transition_to(JobStatus::Paused));
        assert!(JobStatus::Running.can_transition_to(JobStatus::Paused));
        assert!(JobStatus::Paused.can_transition_to(JobStatus::Queued));
        assert!(!JobStatus::Paused.can_transition_to(JobStatus::Running));
    }
}
