//! `/v1/fine_tuning/jobs/{id}/download`: a job's artifact as a tar archive, streamed.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::stream::{self, StreamExt};
use serde::Deserialize;
use studio_core::JobStatus;
use studio_store::keys::{final_adapter_key, ADAPTER_FILES};
use studio_store::{Services, StoreError};
use tokio_util::io::ReaderStream;

use crate::error::ApiError;
use crate::jobs::find_job;

const TAR_BLOCK: u64 = 512;

pub fn router() -> Router<Services> {
    Router::new().route("/v1/fine_tuning/jobs/{job_id}/download", get(download))
}

#[derive(Debug, Deserialize)]
struct DownloadQuery {
    artifact: Option<String>,
}

async fn download(
    State(services): State<Services>,
    Path(job_id): Path<String>,
    query: Result<Query<DownloadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let artifact = query?.0.artifact.unwrap_or_else(|| "adapter".into());
    check_artifact(&artifact)?;
    let job = find_job(&services, &job_id).await?;
    if job.status != JobStatus::Succeeded {
        return Err(ApiError::invalid(
            format!(
                "fine-tuning job {} has no adapter yet: it is {}; download after it has succeeded",
                job.id, job.status
            ),
            Some("artifact"),
            "artifact_not_ready",
        ));
    }

    let mut entries = Vec::with_capacity(ADAPTER_FILES.len());
    // The adapter files sit at the root of the archive, as PEFT loads them from a folder.
    for name in ADAPTER_FILES {
        let (file, len) = services
            .artifacts
            .open(&final_adapter_key(&job.id, name))
            .await
            .map_err(|err| match err {
                StoreError::NotFound { .. } => ApiError::not_found(
                    format!(
                        "the adapter of fine-tuning job {} is missing its {name}",
                        job.id
                    ),
                    Some("artifact"),
                ),
                other => other.into(),
            })?;
        entries.push((name, file, len));
    }

    let mtime = job.finished_at.unwrap_or(job.created_at).timestamp().max(0) as u64;
    let content_length: u64 = entries
        .iter()
        .map(|(_, _, len)| TAR_BLOCK + padded(*len))
        .sum::<u64>()
        + 2 * TAR_BLOCK;
    let mut body = stream::empty().boxed();
    for (name, file, len) in entries {
        let header = tar_header(name, len, mtime)?;
        let padding = Bytes::from(vec![0u8; (padded(len) - len) as usize]);
        body = body
            .chain(stream::iter([Ok(header)]))
            .chain(ReaderStream::new(file))
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
            format!("attachment; filename=\"{}-adapter.tar\"", job.id),
        ),
    ];
    Ok((headers, Body::from_stream(body)).into_response())
}

fn check_artifact(artifact: &str) -> Result<(), ApiError> {
    match artifact {
        "adapter" => Ok(()),
        "merged" | "model" => Err(ApiError::invalid(
            format!("artifact '{artifact}' is not supported yet; use artifact=adapter"),
            Some("artifact"),
            "unsupported_value",
        )),
        other => Err(ApiError::invalid(
            format!("unknown artifact {other:?}; expected one of: adapter, merged, model"),
            Some("artifact"),
            "invalid_value",
        )),
    }
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
