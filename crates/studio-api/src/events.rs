//! `/v1/fine_tuning/jobs/{id}/events`: the job's events, newest first, as OpenAI pages them.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use studio_store::{EventRecord, Services};

use crate::error::ApiError;
use crate::extract::IdPath;
use crate::jobs::find_job;
use crate::pagination::{list_object, ListQuery};

pub fn router() -> Router<Services> {
    Router::new().route("/v1/fine_tuning/jobs/{job_id}/events", get(list_events))
}

pub fn event_object(event: &EventRecord) -> Value {
    json!({
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": event.created_at.timestamp(),
        "level": event.level,
        "message": event.message,
        "data": event.data.clone().unwrap_or_else(|| json!({})),
        "type": event.event_type,
    })
}

async fn list_events(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let page = query?.0.page_request()?;
    let job = find_job(&services, &job_id).await?;
    let events = services.store.list_events(&job.id, &page).await?;
    Ok(Json(list_object(events, event_object)))
}
