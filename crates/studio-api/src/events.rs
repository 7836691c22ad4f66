//! `/v1/fine_tuning/jobs/{id}/events`: the job's events, newest first, as OpenAI pages them, or
//! with `stream=true` as Server-Sent Events (see [`crate::event_stream`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use studio_store::{EventRecord, Services};

use crate::error::ApiError;
use crate::event_stream::{self, StreamShutdown};
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

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(flatten)]
    page: ListQuery,
    /// Kept as text, so that any value other than `true` or `false` gets one message.
    stream: Option<String>,
}

async fn list_events(
    State(services): State<Services>,
    Extension(shutdown): Extension<StreamShutdown>,
    IdPath(job_id): IdPath,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query?.0;
    if stream_requested(query.stream.as_deref())? {
        if query.page.after.is_some() || query.page.limit.is_some() {
            return Err(ApiError::invalid(
                "'after' and 'limit' page the event list and do not apply with stream=true; \
                 send the Last-Event-ID header to resume a stream",
                None,
                "invalid_query",
            ));
        }
        return event_stream::respond(services, &job_id, &headers, shutdown).await;
    }
    let page = query.page.page_request()?;
    let job = find_job(&services, &job_id).await?;
    let events = services.store.list_events(&job.id, &page).await?;
    Ok(Json(list_object(events, event_object)).into_response())
}

fn stream_requested(value: Option<&str>) -> Result<bool, ApiError> {
    match value {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::invalid(
            format!("invalid 'stream' {other:?}: expected true or false"),
            Some("stream"),
            "invalid_value",
        )),
    }
}
