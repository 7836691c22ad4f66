//! `/v1/files`: upload, list, get and download datasets.

use axum::body::Body;
use axum::extract::multipart::Field;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use studio_core::dataset::{DatasetSummary, DatasetValidator};
use studio_core::FileId;
use studio_store::keys::file_key;
use studio_store::{ArtifactWriter, FileRecord, NewFile, Services};

use crate::error::{parse_path_id, ApiError};
use crate::extract::IdPath;
use crate::idempotency::{idempotency_key, IDEMPOTENT_REPLAYED};
use crate::pagination::{list_object, ListQuery};

/// The maximum upload size, in bytes.
pub const MAX_UPLOAD_BYTES: usize = 1 << 30;
/// The maximum length of a stored filename, in bytes.
pub const MAX_FILENAME_BYTES: usize = 255;
/// The maximum length of one dataset line, in bytes. A longer line is almost always a missing
/// line break, and buffering it would take unbounded memory.
pub const MAX_LINE_BYTES: usize = 16 << 20;

pub fn router() -> Router<Services> {
    Router::new()
        .route(
            "/v1/files",
            get(list_files)
                .post(upload_file)
                .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES)),
        )
        .route("/v1/files/{file_id}", get(get_file))
        .route("/v1/files/{file_id}/content", get(file_content))
}

pub fn file_object(file: &FileRecord) -> Value {
    json!({
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at.timestamp(),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": null,
        "format": file.format.as_str(),
        "line_count": file.line_count,
        "sha256": file.sha256,
    })
}

async fn list_files(
    State(services): State<Services>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let page = query?.0.page_request()?;
    let files = services.store.list_files(&page).await?;
    Ok(Json(list_object(files, file_object)))
}

async fn get_file(
    State(services): State<Services>,
    IdPath(file_id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = parse_path_id(&file_id, FileId::parse)?;
    let file = services.store.get_file(&id).await?;
    Ok(Json(file_object(&file)))
}

async fn file_content(
    State(services): State<Services>,
    IdPath(file_id): IdPath,
) -> Result<Response, ApiError> {
    let id = parse_path_id(&file_id, FileId::parse)?;
    let file = services.store.get_file(&id).await?;
    let (content, len) = services.artifacts.open(&file_key(&file.id)).await?;
    let headers = [
        (header::CONTENT_TYPE, "application/jsonl".to_owned()),
        (header::CONTENT_LENGTH, len.to_string()),
        (
            header::CONTENT_DISPOSITION,
            content_disposition(&file.filename),
        ),
    ];
    Ok((headers, Body::from_stream(content)).into_response())
}

/// Streams the upload into a temporary artifact while validating it line by line, and only
/// registers the file once the whole upload is valid. A bad upload leaves nothing behind. A
/// repeat with the first upload's `Idempotency-Key` and the same content, filename and purpose
/// returns the first file.
async fn upload_file(
    State(services): State<Services>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let mut multipart = multipart?;
    let id = FileId::new();
    let mut purpose = None;
    let mut upload = None;

    while let Some(field) = multipart.next_field().await? {
        match field.name() {
            Some("purpose") => purpose = Some(check_purpose(field.text().await?)?),
            Some("file") if upload.is_none() => {
                let writer = services.artifacts.writer(&file_key(&id)).await?;
                upload = Some(receive_file(field, writer).await?);
            }
            Some("file") => {
                return Err(ApiError::invalid(
                    "send exactly one 'file' field",
                    Some("file"),
                    "invalid_value",
                ))
            }
            _ => {}
        }
    }

    let purpose = purpose.ok_or_else(|| missing_field("purpose"))?;
    let upload = upload.ok_or_else(|| missing_field("file"))?;
    let bytes = upload.writer.commit().await?;

    let new_file = NewFile {
        id: id.clone(),
        filename: upload.filename,
        purpose,
        bytes,
        sha256: upload.sha256,
        format: upload.summary.format,
        line_count: upload.summary.line_count as u64,
        idempotency_key: key,
    };
    let record = match services.store.insert_file(&new_file).await {
        Ok(record) => record,
        Err(err) => {
            // The content is committed but unregistered, so remove it to leave no orphan.
            let _ = services.artifacts.delete(&file_key(&id)).await;
            return Err(err.into());
        }
    };
    if record.id != id {
        // A repeat of an earlier upload: the earlier file stays, and this copy goes.
        let _ = services.artifacts.delete(&file_key(&id)).await;
        tracing::info!(file_id = %record.id, "file upload replayed for its Idempotency-Key");
        let mut response = Json(file_object(&record)).into_response();
        response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        return Ok(response);
    }
    tracing::info!(file_id = %record.id, bytes, lines = record.line_count, unknown_keys = upload.summary.unknown_keys, "file uploaded");
    Ok(Json(file_object(&record)).into_response())
}

/// Keeps the last path segment of a client's filename, without control characters and at
/// most [`MAX_FILENAME_BYTES`] long, so it is safe to list and to send back in a header.
fn clean_filename(raw: &str) -> String {
    let last_segment = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let mut name: String = last_segment.chars().filter(|c| !c.is_control()).collect();
    if name.len() > MAX_FILENAME_BYTES {
        let mut end = MAX_FILENAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    let name = name.trim();
    if name.is_empty() || name == "." || name == ".." {
        "upload.jsonl".to_owned()
    } else {
        name.to_owned()
    }
}

/// Builds `attachment; filename="…"; filename*=UTF-8''…` (RFC 6266): an ASCII fallback for
/// old clients and the exact name percent-encoded.
fn content_disposition(filename: &str) -> String {
    let fallback: String = filename
        .chars()
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' => c,
            _ => '_',
        })
        .collect();
    let mut encoded = String::with_capacity(filename.len());
    for byte in filename.bytes() {
        // RFC 5987 attr-char: letters, digits and !#$&+-.^_`|~ go as they are.
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

fn missing_field(name: &str) -> ApiError {
    ApiError::invalid(
        format!("missing required multipart field '{name}'"),
        Some(name),
        "missing_required_parameter",
    )
}

fn check_purpose(purpose: String) -> Result<String, ApiError> {
    if purpose == "fine-tune" {
        Ok(purpose)
    } else {
        Err(ApiError::invalid(
            format!("unsupported purpose {purpose:?}; only 'fine-tune' is supported"),
            Some("purpose"),
            "invalid_value",
        ))
    }
}

struct Upload {
    writer: ArtifactWriter,
    filename: String,
    sha256: String,
    summary: DatasetSummary,
}

async fn receive_file(
    mut field: Field<'_>,
    mut writer: ArtifactWriter,
) -> Result<Upload, ApiError> {
    let filename = clean_filename(field.file_name().unwrap_or(""));
    let mut lines = LineSplitter::default();
    let mut hasher = Sha256::new();

    while let Some(chunk) = field.chunk().await? {
        hasher.update(&chunk);
        writer.write(&chunk).await?;
        lines.push(&chunk)?;
    }
    let summary = lines.finish()?;

    Ok(Upload {
        writer,
        filename,
        sha256: format!("{:x}", hasher.finalize()),
        summary,
    })
}

/// Cuts a byte stream into lines and validates each as soon as it is complete.
#[derive(Default)]
struct LineSplitter {
    pending: Vec<u8>,
    validator: DatasetValidator,
    line: usize,
}

impl LineSplitter {
    fn push(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(offset) = self.pending[start..].iter().position(|&b| b == b'\n') {
            let end = start + offset;
            let line = self.pending[start..end].to_vec();
            self.validate(&line)?;
            start = end + 1;
        }
        self.pending.drain(..start);
        if self.pending.len() > MAX_LINE_BYTES {
            return Err(bad_file(format!(
                "line {} is longer than {} MiB; write one JSON object per line",
                self.line + 1,
                MAX_LINE_BYTES >> 20
            )));
        }
        Ok(())
    }

    fn validate(&mut self, line: &[u8]) -> Result<(), ApiError> {
        self.line += 1;
        let text = std::str::from_utf8(line).map_err(|_| {
            bad_file(format!(
                "line {}: not valid UTF-8; save the file as UTF-8",
                self.line
            ))
        })?;
        self.validator
            .push_line(text)
            .map_err(|err| bad_file(err.to_string()))?;
        Ok(())
    }

    fn finish(mut self) -> Result<DatasetSummary, ApiError> {
        if !self.pending.is_empty() {
            let last = std::mem::take(&mut self.pending);
            self.validate(&last)?;
        }
        self.validator
            .finish()
            .map_err(|err| bad_file(err.to_string()))
    }
}

fn bad_file(message: String) -> ApiError {
    ApiError::invalid(
        format!("invalid training file: {message}"),
        Some("file"),
        "invalid_file",
    )
}
