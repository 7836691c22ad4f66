//! `/v1/fine_tuning/jobs`: create, list, get, cancel, pause and resume fine-tuning jobs.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use studio_core::{FileId, JobId, JobSpec};
use studio_store::{
    CancelOutcome, EventLevel, JobRecord, NewEvent, NewJob, PageRequest, PauseOutcome, Services,
    StoreError,
};

use crate::error::{parse_path_id, ApiError};
use crate::extract::{IdPath, RawBody};
use crate::idempotency::{idempotency_key, request_hash, IDEMPOTENT_REPLAYED};
use crate::pagination::{list_object, ListQuery};

/// How often a job may be claimed before an expired lease fails it.
const MAX_ATTEMPTS: u32 = 3;
/// The `organization_id` of every job: a self-hosted deployment has one organization.
const ORGANIZATION_ID: &str = "org-studio";

pub fn router() -> Router<Services> {
    Router::new()
        .route("/v1/fine_tuning/jobs", get(list_jobs).post(create_job))
        .route("/v1/fine_tuning/jobs/{job_id}", get(get_job))
        .route("/v1/fine_tuning/jobs/{job_id}/cancel", post(cancel_job))
        .route("/v1/fine_tuning/jobs/{job_id}/pause", post(pause_job))
        .route("/v1/fine_tuning/jobs/{job_id}/resume", post(resume_job))
}

/// Loads the job named in a path, or a 404.
pub async fn find_job(services: &Services, job_id: &str) -> Result<JobRecord, ApiError> {
    let id = parse_path_id(job_id, JobId::parse)?;
    Ok(services.store.get_job(&id).await?)
}

pub fn job_object(job: &JobRecord) -> Value {
    let spec = &job.spec;
    json!({
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at.timestamp(),
        "finished_at": job.finished_at.map(|t| t.timestamp()),
        "model": spec.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": ORGANIZATION_ID,
        "status": job.status,
        "training_file": spec.training_file,
        "validation_file": spec.validation_file,
        "hyperparameters": spec.hyperparameters(),
        "method": spec.method,
        "training_type": spec.training_type,
        "trained_tokens": job.trained_tokens,
        "error": job.error,
        "result_files": [],
        "seed": spec.seed,
        "estimated_finish": null,
        "integrations": [],
        "metadata": spec.metadata,
        "user_provided_suffix": spec.suffix,
    })
}

/// Creates a job. With an `Idempotency-Key` that created a job before, it returns that job
/// (with `Idempotent-Replayed: true`) when the body is the same, and a 400 when it differs.
async fn create_job(
    State(services): State<Services>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let body = parse_json_body(&body)?;
    let hash = key.as_ref().map(|_| request_hash(&body));
    // NOTE: a repeat is validated again before the store finds the first job, so a repeat
    // after its base model was removed from the models folder gets a 400, not that job.
    let spec = JobSpec::parse(&body, random_seed())?;

    let model = services.models.resolve(&spec.model)?;
    if let Some(distillation) = spec.distillation() {
        check_teacher(&services, &distillation.teacher_model).await?;
        if let Some(layers) = &distillation.student_layers {
            check_student_layers(model.path, layers).await?;
        }
    }
    let training = check_file(&services, &spec.training_file, "training_file").await?;
    check_file_format(&spec, &training, FileRole::Training)?;
    if let Some(validation_file) = &spec.validation_file {
        let validation = check_file(&services, validation_file, "validation_file").await?;
        check_file_format(&spec, &validation, FileRole::Validation)?;
    }

    let new_job = NewJob {
        id: JobId::new(),
        spec,
        max_attempts: MAX_ATTEMPTS,
        idempotency_key: key,
        request_hash: hash,
    };
    let job = services.store.insert_job(&new_job).await?;
    if job.id != new_job.id {
        tracing::info!(job_id = %job.id, "fine-tuning job create replayed for its Idempotency-Key");
        let mut response = Json(job_object(&job)).into_response();
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        return Ok(response);
    }
    let message = format!(
        "Created fine-tuning job {}; training file {} has {} examples in the {} format",
        job.id,
        training.id,
        training.line_count,
        training.format.as_str()
    );
    services
        .store
        .insert_event(&NewEvent::message(&job.id, EventLevel::Info, message))
        .await?;
    tracing::info!(job_id = %job.id, model = %job.spec.model, "fine-tuning job queued");
    Ok(Json(job_object(&job)).into_response())
}

/// Checks that a distillation teacher names an installed base model or a succeeded job's
/// `fine_tuned_model`.
pub(crate) async fn check_teacher(services: &Services, teacher: &str) -> Result<(), ApiError> {
    if services.models.resolve(teacher).is_ok() {
        return Ok(());
    }
    let jobs = services.store.list_succeeded_jobs().await?;
    if jobs.iter().any(|job| job.fine_tuned_model.as_deref() == Some(teacher)) {
        return Ok(());
    }
    Err(ApiError::invalid(
        format!("teacher model '{teacher}' not found; use a base model or a succeeded job's fine_tuned_model, as GET /v1/models lists them"),
        Some("method.distillation.teacher_model"),
        "model_not_found",
    ))
}

/// Checks `student_layers` against the layer count in the model's config, so a bad index is a
/// 400 now and not a failure after the teacher has answered every prompt. A config that cannot
/// be read is left to the worker, whose load error names the problem.
async fn check_student_layers(model_path: std::path::PathBuf, layers: &[u32]) -> Result<(), ApiError> {
    let layers: Vec<usize> = layers.iter().map(|&layer| layer as usize).collect();
    let path = model_path.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let config = studio_train::loader::read_config(&path)?;
        studio_train::distill::check_student_layers(&layers, config.num_hidden_layers)
    })
    .await
    .map_err(|err| ApiError::internal(format!("the student_layers check task failed: {err}")))?;
    match checked {
        Err(studio_train::TrainError::InvalidData { message, param }) => Err(ApiError::invalid(
            format!("{message}; list layer indices of the job's model"),
            param.as_deref(),
            "invalid_value",
        )),
        Err(err) => {
            tracing::warn!(model_path = %model_path.display(), error = %err, "cannot read the model config to check student_layers; the worker checks them");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

pub fn parse_json_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|err| {
        ApiError::invalid(
            format!("the request body is not valid JSON: {err}"),
            None,
            "invalid_json",
        )
    })
}

/// Checks that `id` names an uploaded fine-tune file; the error lists recent ones.
pub async fn check_file(
    services: &Services,
    id: &FileId,
    param: &str,
) -> Result<studio_store::FileRecord, ApiError> {
    let file = match services.store.get_file(id).await {
        Ok(file) => file,
        Err(studio_store::StoreError::NotFound { .. }) => {
            let recent = services.store.list_files(&PageRequest::first(10)).await?;
            let listed: Vec<String> = recent
                .data
                .iter()
                .map(|f| format!("{} ({})", f.id, f.filename))
                .collect();
            let hint = if listed.is_empty() {
                "no files are uploaded yet; upload one with POST /v1/files".to_owned()
            } else {
                format!("recent files: {}", listed.join(", "))
            };
            return Err(ApiError::invalid(
                format!("{param} {id} not found; {hint}"),
                Some(param),
                "file_not_found",
            ));
        }
        Err(err) => return Err(err.into()),
    };
    if file.purpose != "fine-tune" {
        return Err(ApiError::invalid(
            format!(
                "{param} {id} has purpose '{}'; upload it with purpose 'fine-tune'",
                file.purpose
            ),
            Some(param),
            "invalid_file_purpose",
        ));
    }
    Ok(file)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileRole {
    Training,
    Validation,
}

/// Checks that a file's format suits the job's method: preference pairs for DPO and
/// conversations otherwise. Prompts without replies suit only a distillation job's training
/// file, since its teacher writes the replies. A validation file must contain the replies it
/// scores.
pub(crate) fn check_file_format(spec: &JobSpec, file: &studio_store::FileRecord, role: FileRole) -> Result<(), ApiError> {
    use studio_core::dataset::DatasetFormat;
    let (param, code) = match role {
        FileRole::Training => ("training_file", "invalid_training_file"),
        FileRole::Validation => ("validation_file", "invalid_validation_file"),
    };
    let dpo = matches!(spec.method, studio_core::spec::Method::Dpo { .. });
    let message = match file.format {
        DatasetFormat::Preference if dpo => return Ok(()),
        _ if dpo => format!(
            "{param} {} is in the {} format, but a DPO job needs preference pairs ({{\"prompt\", \"chosen\", \"rejected\"}} or OpenAI's preference format)",
            file.id,
            file.format.as_str()
        ),
        DatasetFormat::Preference => format!(
            "{param} {} contains preference pairs; use method.type 'dpo' or upload conversations",
            file.id
        ),
        DatasetFormat::Prompts if role == FileRole::Validation => format!(
            "validation_file {} holds prompts without replies, but validation scores the replies a file contains; upload conversations that end with an assistant reply",
            file.id
        ),
        DatasetFormat::Prompts if spec.distillation().is_none() => format!(
            "training_file {} holds prompts without replies, which only a distillation job uses (its teacher writes the replies); upload conversations that end with an assistant reply",
            file.id
        ),
        _ => return Ok(()),
    };
    Err(ApiError::invalid(message, Some(param), code))
}

/// Draws a seed for a request without one. The job echoes it, so the run can be repeated.
fn random_seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

async fn list_jobs(
    State(services): State<Services>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let page = query?.0.page_request()?;
    let jobs = services.store.list_jobs(&page).await?;
    Ok(Json(list_object(jobs, job_object)))
}

async fn get_job(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let job = find_job(&services, &job_id).await?;
    Ok(Json(job_object(&job)))
}

async fn cancel_job(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = parse_path_id(&job_id, JobId::parse)?;
    let job = match services.store.request_cancel(&id).await? {
        CancelOutcome::Cancelled(job) => {
            // A paused job, or one waiting to retry, has run before.
            let message = if job.started_at.is_none() {
                "Fine-tuning job cancelled before it started"
            } else {
                "Fine-tuning job cancelled while no worker was running it"
            };
            let event = NewEvent::message(&job.id, EventLevel::Info, message);
            services.store.insert_event(&event).await?;
            job
        }
        CancelOutcome::Requested(job) => {
            let message = "Cancel requested. The worker sees it at its next heartbeat and stops the job after the step it is running then";
            services.store.insert_event(&NewEvent::message(&job.id, EventLevel::Info, message)).await?;
            job
        }
        CancelOutcome::AlreadyFinished(job) => {
            return Err(ApiError::invalid(
                format!(
                    "fine-tuning job {} cannot be cancelled: it already {}; only queued, paused or running jobs can be cancelled",
                    job.id,
                    finished_phrase(job.status)
                ),
                None,
                "job_already_finished",
            ))
        }
    };
    tracing::info!(job_id = %job.id, status = %job.status, "fine-tuning job cancel requested");
    Ok(Json(job_object(&job)))
}

fn finished_phrase(status: studio_core::JobStatus) -> String {
    match status {
        studio_core::JobStatus::Succeeded => "succeeded".into(),
        studio_core::JobStatus::Failed => "failed".into(),
        studio_core::JobStatus::Cancelled => "was cancelled".into(),
        other => format!("is {other}"),
    }
}

async fn pause_job(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = parse_path_id(&job_id, JobId::parse)?;
    let job = match services.store.request_pause(&id).await {
        Ok(PauseOutcome::Paused(job)) => {
            let message = "Fine-tuning job paused before it started; resume it to queue it again";
            services.store.insert_event(&NewEvent::message(&job.id, EventLevel::Info, message)).await?;
            job
        }
        Ok(PauseOutcome::Requested(job)) => {
            let message = "Pause requested. The worker sees it at its next heartbeat, finishes the step it is running then, writes a checkpoint and pauses the job";
            services.store.insert_event(&NewEvent::message(&job.id, EventLevel::Info, message)).await?;
            job
        }
        Ok(PauseOutcome::AlreadyPaused(job)) => job,
        Err(StoreError::Conflict(message)) => {
            return Err(ApiError::invalid(message, None, "job_not_pausable"))
        }
        Err(err) => return Err(err.into()),
    };
    tracing::info!(job_id = %job.id, status = %job.status, "fine-tuning job pause requested");
    Ok(Json(job_object(&job)))
}

async fn resume_job(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
) -> Result<Json<Value>, ApiError> {
    let id = parse_path_id(&job_id, JobId::parse)?;
    let job = match services.store.resume_job(&id).await {
        Ok(job) => job,
        Err(StoreError::Conflict(message)) => {
            return Err(ApiError::invalid(message, None, "job_not_paused"))
        }
        Err(err) => return Err(err.into()),
    };
    let message = "Fine-tuning job resumed; it waits in the queue and continues from its latest checkpoint";
    services.store.insert_event(&NewEvent::message(&job.id, EventLevel::Info, message)).await?;
    tracing::info!(job_id = %job.id, "fine-tuning job resumed");
    Ok(Json(job_object(&job)))
}
