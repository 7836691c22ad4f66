//! Conversions between domain values and column values that both backends share.

use studio_core::{FileId, JobId, JobStatus};

use crate::records::{FileRecord, JobRecord, NewFile, Page};
use crate::StoreError;

/// Splits the `limit + 1` rows of a page query into the page and `has_more`.
pub(crate) fn into_page<R, T>(
    mut rows: Vec<R>,
    limit: u32,
    decode: impl Fn(&R) -> Result<T, StoreError>,
) -> Result<Page<T>, StoreError> {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let data = rows.iter().map(decode).collect::<Result<_, _>>()?;
    Ok(Page { data, has_more })
}

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A stored value the current code cannot read: the database was written by another version.
pub(crate) fn corrupt(what: &str, err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::other(format!("cannot decode stored {what}"), err)
}

pub(crate) fn job_id(value: String) -> Result<JobId, StoreError> {
    JobId::parse(&value).map_err(|err| corrupt("job id", err))
}

pub(crate) fn status(value: String) -> Result<JobStatus, StoreError> {
    value.parse().map_err(|err| corrupt("job status", err))
}

/// Builds the error for a create whose Idempotency-Key was stored with another request.
pub(crate) fn idempotency_mismatch(key: &str, existing: &JobId) -> StoreError {
    StoreError::Conflict(format!(
        "Idempotency-Key {key:?} was already used to create fine-tuning job {existing} with a \
         different request body; repeat that request unchanged, or send a new key for a new job"
    ))
}

/// Builds the error for an upload whose `Idempotency-Key` created a different file.
pub(crate) fn file_idempotency_mismatch(key: &str, existing: &FileId) -> StoreError {
    StoreError::Conflict(format!(
        "Idempotency-Key {key:?} was already used to upload file {existing} with different content, \
         filename or purpose; repeat that upload unchanged, or send a new key for a new file"
    ))
}

/// Returns whether `file` is the upload that `existing` stores.
pub(crate) fn same_upload(existing: &FileRecord, file: &NewFile) -> bool {
    existing.sha256 == file.sha256 && existing.filename == file.filename && existing.purpose == file.purpose
}

/// Builds the error for a pause request on a job that cannot be paused.
pub(crate) fn not_pausable(job: &JobRecord) -> StoreError {
    if job.status == JobStatus::Running && job.cancel_requested {
        return StoreError::Conflict(format!(
            "fine-tuning job {} cannot be paused: its cancel was already requested, and it stops at its worker's next heartbeat",
            job.id
        ));
    }
    StoreError::Conflict(format!(
        "fine-tuning job {} cannot be paused: it is {}; only queued or running jobs can be paused",
        job.id, job.status
    ))
}

/// Builds the error for a resume of a job that is not paused.
pub(crate) fn not_resumable(job: &JobRecord) -> StoreError {
    StoreError::Conflict(format!(
        "fine-tuning job {} cannot be resumed: it is {}; only paused jobs can be resumed",
        job.id, job.status
    ))
}
