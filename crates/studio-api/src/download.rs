//! `/v1/fine_tuning/jobs/{id}/download`: a job's artifact or a checkpoint's weights as a tar
//! archive, streamed.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Deserialize;
use studio_core::spec::TrainingType;
use studio_core::{CheckpointId, JobId, JobSpec, JobStatus};
use studio_store::keys::{final_artifact_prefix, ADAPTER_FILES};
use studio_store::{ArtifactStore, ArtifactStream, JobRecord, Services, StoreError};

use crate::error::ApiError;
use crate::extract::IdPath;
use crate::jobs::find_job;

const TAR_BLOCK: u64 = 512;
/// Every artifact name the route accepts.
const ARTIFACTS: [&str; 3] = ["adapter", "merged", "model"];
/// The weights file of a full fine-tuning checkpoint.
const FULL_CHECKPOINT_WEIGHTS: &str = "model.safetensors";

pub fn router() -> Router<Services> {
    Router::new().route("/v1/fine_tuning/jobs/{job_id}/download", get(download))
}

#[derive(Debug, Deserialize)]
struct DownloadQuery {
    artifact: Option<String>,
    /// A `ftckpt-` id of the job; without it, the final artifact.
    checkpoint: Option<String>,
}

/// Returns the artifacts a job of this spec produces; the first is the default download.
fn artifacts_of(spec: &JobSpec) -> &'static [&'static str] {
    match spec.training_type {
        TrainingType::Lora(_) => &["adapter", "merged"],
        TrainingType::Full => &["model"],
    }
}

/// One file of the archive: its name inside the archive and its artifact key.
struct Entry {
    name: String,
    key: String,
}

async fn download(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
    query: Result<Query<DownloadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query?.0;
    let job = find_job(&services, &job_id).await?;
    let available = artifacts_of(&job.spec);
    let artifact = query.artifact.as_deref().unwrap_or(available[0]);
    check_artifact(&job, artifact, available)?;

    let (entries, archive_name) = match query.checkpoint.as_deref() {
        Some(checkpoint) => checkpoint_entries(&services, &job, artifact, checkpoint).await?,
        None => final_entries(&services, &job, artifact).await?,
    };
    tar_response(&services, &job, entries, &archive_name).await
}

fn check_artifact(job: &JobRecord, artifact: &str, available: &[&str]) -> Result<(), ApiError> {
    if !ARTIFACTS.contains(&artifact) {
        return Err(ApiError::invalid(
            format!(
                "unknown artifact {artifact:?}; expected one of: {}",
                ARTIFACTS.join(", ")
            ),
            Some("artifact"),
            "invalid_value",
        ));
    }
    if !available.contains(&artifact) {
        return Err(ApiError::invalid(
            format!(
                "fine-tuning job {} has no '{artifact}' artifact; it has: {}",
                job.id,
                available.join(", ")
            ),
            Some("artifact"),
            "artifact_not_available",
        ));
    }
    Ok(())
}

/// Lists the files of the final artifact of a succeeded job, shards included.
async fn final_entries(
    services: &Services,
    job: &JobRecord,
    artifact: &str,
) -> Result<(Vec<Entry>, String), ApiError> {
    if job.status != JobStatus::Succeeded {
        return Err(ApiError::invalid(
            format!(
                "fine-tuning job {} has no {artifact} yet: it is {}; download after it has succeeded, or pass checkpoint=ftckpt-…",
                job.id, job.status
            ),
            Some("artifact"),
            "artifact_not_ready",
        ));
    }
    if artifact == "merged" {
        crate::merge::ensure_merged(services, job).await?;
    }
    let prefix = final_artifact_prefix(&job.id, artifact);
    let files = services.artifacts.list(&prefix).await?;
    if files.is_empty() {
        return Err(ApiError::not_found(
            format!(
                "the {artifact} of fine-tuning job {} is missing from storage",
                job.id
            ),
            Some("artifact"),
        ));
    }
    let entries = files
        .into_iter()
        .map(|(name, _)| Entry {
            key: format!("{prefix}/{name}"),
            name,
        })
        .collect();
    Ok((entries, format!("{}-{artifact}.tar", job.id)))
}

/// Lists the weight files of a checkpoint: the adapter of a LoRA job, the model weights of a
/// full one. Optimizer moments and trainer state stay out, since only resuming needs them.
async fn checkpoint_entries(
    services: &Services,
    job: &JobRecord,
    artifact: &str,
    checkpoint: &str,
) -> Result<(Vec<Entry>, String), ApiError> {
    let not_found = || {
        ApiError::not_found(
            format!("checkpoint {checkpoint} of fine-tuning job {} not found; list them with GET /v1/fine_tuning/jobs/{}/checkpoints", job.id, job.id),
            Some("checkpoint"),
        )
    };
    let id = CheckpointId::parse(checkpoint).map_err(|_| not_found())?;
    let checkpoint = match services.store.get_checkpoint(&job.id, &id).await {
        Ok(checkpoint) => checkpoint,
        Err(StoreError::NotFound { .. }) => return Err(not_found()),
        Err(err) => return Err(err.into()),
    };
    let names: &[&str] = match artifact {
        "adapter" => &ADAPTER_FILES,
        "model" => &[FULL_CHECKPOINT_WEIGHTS],
        other => {
            return Err(ApiError::invalid(
                format!("checkpoints hold no '{other}' artifact; use artifact=adapter, or download the final merged model without checkpoint"),
                Some("artifact"),
                "artifact_not_available",
            ))
        }
    };
    let entries = names
        .iter()
        .map(|name| Entry {
            name: (*name).to_owned(),
            key: format!("{}/{name}", checkpoint.artifact_key),
        })
        .collect();
    let archive_name = format!("{}-step-{}-{artifact}.tar", job.id, checkpoint.step);
    Ok((entries, archive_name))
}

/// Streams `entries` as a tar archive with their names at its root. The sizes are looked up
/// first, for the headers; each artifact is opened only when the archive reaches it.
async fn tar_response(
    services: &Services,
    job: &JobRecord,
    entries: Vec<Entry>,
    archive_name: &str,
) -> Result<Response, ApiError> {
    let mut sized = Vec::with_capacity(entries.len());
    for entry in entries {
        let len = services
            .artifacts
            .size(&entry.key)
            .await
            .map_err(|err| match err {
                StoreError::NotFound { .. } => ApiError::not_found(
                    format!(
                        "the artifact of fine-tuning job {} is missing its {}",
                        job.id, entry.name
                    ),
                    Some("artifact"),
                ),
                other => other.into(),
            })?;
        sized.push((entry, len));
    }

    let mtime = job.finished_at.unwrap_or(job.created_at).timestamp().max(0) as u64;
    let content_length: u64 = sized
        .iter()
        .map(|(_, len)| TAR_BLOCK + padded(*len))
        .sum::<u64>()
        + 2 * TAR_BLOCK;
    let mut body = stream::empty().boxed();
    for (entry, len) in sized {
        let header = tar_header(&entry.name, len, mtime)?;
        let padding = Bytes::from(vec![0u8; (padded(len) - len) as usize]);
        let content = artifact_content(services.artifacts.clone(), job.id.clone(), entry.key, len);
        body = body
            .chain(stream::iter([Ok(header)]))
            .chain(content)
            .chain(stream::iter([Ok(padding)]))
            .boxed();
    }
    // Two zero blocks end a tar archive.
    body = body
        .chain(stream::iter([Ok(Bytes::from(vec![
            0u8;
            2 * TAR_BLOCK as usize
        ]))]))
        .boxed();

    let headers = [
        (header::CONTENT_TYPE, "application/x-tar".to_owned()),
        (header::CONTENT_LENGTH, content_length.to_string()),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{archive_name}\""),
        ),
    ];
    Ok((headers, Body::from_stream(body)).into_response())
}

/// Opens `key` when the stream is first polled, so a download keeps one artifact read open at
/// a time. An artifact whose size differs from `len`, the size in its tar header, fails the
/// stream, since its content would no longer match the header.
fn artifact_content(
    artifacts: Arc<ArtifactStore>,
    job_id: JobId,
    key: String,
    len: u64,
) -> ArtifactStream {
    stream::once(async move {
        let opened = match artifacts.open(&key).await {
            Ok((_, size)) if size != len => Err(std::io::Error::other(format!(
                "artifact {key} changed from {len} to {size} bytes during the download"
            ))),
            Ok((content, _)) => Ok(content),
            Err(err) => Err(std::io::Error::other(err)),
        };
        if let Err(err) = &opened {
            tracing::error!(job_id = %job_id, artifact = %key, error = %err, "the download stopped: an artifact could not be read");
        }
        opened
    })
    .try_flatten()
    .boxed()
}

/// Rounds the size of a tar entry's data up to whole blocks.
fn padded(len: u64) -> u64 {
    len.div_ceil(TAR_BLOCK) * TAR_BLOCK
}

fn tar_header(name: &str, len: u64, mtime: u64) -> Result<Bytes, ApiError> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name).map_err(ApiError::internal)?;
    header.set_size(len);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Ok(Bytes::copy_from_slice(header.as_bytes()))
}
