//! `/v1/models`: base models from the catalog and the fine-tuned models of succeeded jobs.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use studio_store::Services;

use crate::error::ApiError;

pub fn router() -> Router<Services> {
    Router::new().route("/v1/models", get(list_models))
}

async fn list_models(State(services): State<Services>) -> Result<Json<Value>, ApiError> {
    let catalog = services.models.clone();
    let base_models = tokio::task::spawn_blocking(move || catalog.list())
        .await
        .map_err(ApiError::internal)??;
    let jobs = services.store.list_succeeded_jobs().await?;

    let base = base_models.iter().map(|model| {
        json!({"id": model.name, "object": "model", "created": model.created_at.timestamp(), "owned_by": "system"})
    });
    let fine_tuned = jobs.iter().filter_map(|job| {
        let id = job.fine_tuned_model.as_ref()?;
        let created = job.finished_at.unwrap_or(job.created_at).timestamp();
        Some(json!({"id": id, "object": "model", "created": created, "owned_by": "user", "parent": job.spec.model}))
    });
    Ok(Json(
        json!({"object": "list", "data": base.chain(fine_tuned).collect::<Vec<_>>()}),
    ))
}
