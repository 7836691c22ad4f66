//! `/healthz`: liveness. It responds without touching the database, so a slow database does not
//! get the process restarted.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use studio_store::Services;

pub fn router() -> Router<Services> {
    Router::new().route("/healthz", get(healthz))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}
