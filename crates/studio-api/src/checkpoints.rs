//! `/v1/fine_tuning/jobs/{id}/checkpoints`: the job's checkpoints, latest step first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use studio_store::{CheckpointRecord, JobRecord, Services};

use crate::error::ApiError;
use crate::extract::IdPath;
use crate::jobs::find_job;
use crate::pagination::{list_object, ListQuery};

pub fn router() -> Router<Services> {
    Router::new().route(
        "/v1/fine_tuning/jobs/{job_id}/checkpoints",
        get(list_checkpoints),
    )
}

/// OpenAI's `fine_tuning.job.checkpoint`; the model name is the job's with `:ckpt-step-{n}`.
pub fn checkpoint_object(job: &JobRecord, checkpoint: &CheckpointRecord) -> Value {
    json!({
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": checkpoint.created_at.timestamp(),
        "fine_tuned_model_checkpoint": format!("{}:ckpt-step-{}", job.spec.fine_tuned_model(&job.id), checkpoint.step),
        "fine_tuning_job_id": job.id,
        "step_number": checkpoint.step,
        "metrics": checkpoint.metrics,
    })
}

async fn list_checkpoints(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let page = query?.0.page_request()?;
    let job = find_job(&services, &job_id).await?;
    let checkpoints = services.store.list_checkpoints(&job.id, &page).await?;
    Ok(Json(list_object(checkpoints, |checkpoint| {
        checkpoint_object(&job, checkpoint)
    })))
}
