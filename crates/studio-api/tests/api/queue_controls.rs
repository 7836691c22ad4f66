//! Pause and resume routes, the `Idempotency-Key` header on job creation and file upload, and
//! the 503 with `Retry-After` that a request gets while the database cannot be reached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use studio_core::JobId;
use studio_store::{
    PageRequest, PgStore, SqliteStore, Store, StoreError, SystemClock, POSTGRES_ACQUIRE_TIMEOUT,
};

use super::{test_app, TestApp, TestResponse};

/// Slack on top of the pool's acquire timeout for a request against a closed port.
const OUTAGE_SLACK: Duration = Duration::from_secs(5);

impl TestApp {
    async fn post_raw(&self, uri: &str, body: &str, key: Option<&[u8]>) -> TestResponse {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(request.body(Body::from(body.to_owned())).unwrap())
            .await
    }

    async fn queued_job_id(&self) -> String {
        let file_id = self.uploaded_file_id().await;
        self.created_job(&file_id).await["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn job_count(&self) -> usize {
        let page = self
            .services
            .store
            .list_jobs(&PageRequest::first(100))
            .await
            .unwrap();
        page.data.len()
    }
}

fn assert_error(response: &TestResponse, status: StatusCode, code: &str, words: &[&str]) {
    let body = String::from_utf8_lossy(&response.body);
    assert_eq!(response.status, status, "{body}");
    assert_eq!(response.json()["error"]["code"], code, "{body}");
    let message = response.error_message();
    for word in words {
        assert!(message.contains(word), "{message:?} does not name {word:?}");
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn pause_and_resume_queued_job(pool: PgPool) {
    let app = test_app(pool);
    let id = app.queued_job_id().await;

    let paused = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/pause"), json!({}))
        .await;
    let paused_again = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/pause"), json!({}))
        .await;
    let resumed = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/resume"), json!({}))
        .await;
    let resumed_again = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/resume"), json!({}))
        .await;

    assert_eq!(paused.status, StatusCode::OK);
    assert_eq!(paused.json()["object"], "fine_tuning.job");
    assert_eq!(paused.json()["status"], "paused");
    assert_eq!(paused_again.status, StatusCode::OK);
    assert_eq!(paused_again.json()["status"], "paused");
    assert_eq!(resumed.status, StatusCode::OK);
    assert_eq!(resumed.json()["status"], "queued");
    assert_error(
        &resumed_again,
        StatusCode::BAD_REQUEST,
        "job_not_paused",
        &[&id, "it is queued", "only paused jobs"],
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn pause_of_running_job_is_requested(pool: PgPool) {
    let app = test_app(pool);
    let id = app.queued_job_id().await;
    app.services
        .store
        .claim_job("w1", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();

    let response = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/pause"), json!({}))
        .await;
    let beat = app
        .services
        .store
        .heartbeat(&JobId::parse(&id).unwrap(), "w1", Duration::from_secs(60))
        .await
        .unwrap();
    let events = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/events"))
        .await
        .json();

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["status"], "running");
    assert!(beat.pause_requested);
    let messages: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["message"].as_str().unwrap())
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("Pause requested")),
        "{messages:?}"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_of_paused_job_after_steps(pool: PgPool) {
    let app = test_app(pool);
    let id = app.queued_job_id().await;
    let job_id = JobId::parse(&id).unwrap();
    let store = &app.services.store;
    store.claim_job("w1", Duration::from_secs(60)).await.unwrap().unwrap();
    store.request_pause(&job_id).await.unwrap();
    store.pause_running_job(&job_id, "w1").await.unwrap();

    let response = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({}))
        .await;
    let events = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=1"))
        .await
        .json();

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["status"], "cancelled");
    assert_eq!(
        events["data"][0]["message"],
        "Fine-tuning job cancelled while no worker was running it",
        "a job that ran steps did not get cancelled before it started"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn pause_of_finished_or_unknown_job_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let id = app.queued_job_id().await;
    app.post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({}))
        .await;

    let finished = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/pause"), json!({}))
        .await;
    let resume_finished = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/resume"), json!({}))
        .await;
    let unknown = app
        .post_json("/v1/fine_tuning/jobs/ftjob-nope/pause", json!({}))
        .await;
    let malformed = app
        .post_json("/v1/fine_tuning/jobs/garbage/resume", json!({}))
        .await;

    assert_error(
        &finished,
        StatusCode::BAD_REQUEST,
        "job_not_pausable",
        &[&id, "it is cancelled", "only queued or running jobs"],
    );
    assert_error(
        &resume_finished,
        StatusCode::BAD_REQUEST,
        "job_not_paused",
        &["it is cancelled"],
    );
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(malformed.status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrations = "../../migrations")]
async fn idempotency_key_replays_first_job(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let body = format!(r#"{{"model": "tiny", "training_file": "{file_id}", "suffix": "once"}}"#);
    // The same request with its keys reordered and no spaces, as another client may encode it.
    let reordered = format!(r#"{{"suffix":"once","training_file":"{file_id}","model":"tiny"}}"#);

    let first = app
        .post_raw("/v1/fine_tuning/jobs", &body, Some(b"create-job-1"))
        .await;
    let repeat = app
        .post_raw("/v1/fine_tuning/jobs", &reordered, Some(b"create-job-1"))
        .await;
    let other_key = app
        .post_raw("/v1/fine_tuning/jobs", &body, Some(b"create-job-2"))
        .await;
    let id = first.json()["id"].as_str().unwrap().to_owned();
    let events = app.get(&format!("/v1/fine_tuning/jobs/{id}/events")).await;

    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers.get("idempotent-replayed"), None);
    assert_eq!(repeat.status, StatusCode::OK);
    assert_eq!(repeat.json(), first.json());
    assert_eq!(repeat.headers["idempotent-replayed"], "true");
    assert_ne!(other_key.json()["id"], first.json()["id"]);
    assert_eq!(app.job_count().await, 2);
    assert_eq!(
        events.json()["data"].as_array().unwrap().len(),
        1,
        "a replay must not record a second creation event: {}",
        events.json()
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn idempotency_key_replays_first_upload(pool: PgPool) {
    let app = test_app(pool);
    let content = format!("{}\n", super::CHAT_LINE);

    let first = app.upload_with_key("train.jsonl", "fine-tune", &content, Some("upload-1")).await;
    let repeat = app.upload_with_key("train.jsonl", "fine-tune", &content, Some("upload-1")).await;
    let changed = app
        .upload_with_key("train.jsonl", "fine-tune", &format!("{content}{content}"), Some("upload-1"))
        .await;
    let files = app.get("/v1/files").await;
    let stored = app.services.artifacts.list("files").await.unwrap();

    assert_eq!(first.status, StatusCode::OK, "{}", String::from_utf8_lossy(&first.body));
    assert_eq!(first.headers.get("idempotent-replayed"), None);
    assert_eq!(repeat.status, StatusCode::OK);
    assert_eq!(repeat.json(), first.json());
    assert_eq!(repeat.headers["idempotent-replayed"], "true");
    let id = first.json()["id"].as_str().unwrap().to_owned();
    assert_error(&changed, StatusCode::BAD_REQUEST, "conflict", &["upload-1", &id, "different content"]);
    assert_eq!(files.json()["data"].as_array().unwrap().len(), 1, "{}", files.json());
    assert_eq!(stored.len(), 1, "the repeated and the rejected uploads leave no content behind: {stored:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn idempotency_key_with_other_body_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let first = app
        .post_raw(
            "/v1/fine_tuning/jobs",
            &json!({"model": "tiny", "training_file": file_id, "suffix": "a"}).to_string(),
            Some(b"create-job-3"),
        )
        .await;

    let changed = app
        .post_raw(
            "/v1/fine_tuning/jobs",
            &json!({"model": "tiny", "training_file": file_id, "suffix": "b"}).to_string(),
            Some(b"create-job-3"),
        )
        .await;

    let id = first.json()["id"].as_str().unwrap().to_owned();
    assert_error(
        &changed,
        StatusCode::BAD_REQUEST,
        "conflict",
        &["create-job-3", &id, "different request body"],
    );
    assert_eq!(app.job_count().await, 1);
}

#[sqlx::test(migrations = "../../migrations")]
async fn invalid_idempotency_key_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let body = json!({"model": "tiny", "training_file": file_id}).to_string();
    let long = "k".repeat(256);
    let cases: [(&[u8], &str); 3] = [
        (b"", "0 bytes long"),
        (long.as_bytes(), "256 bytes long"),
        ("clé".as_bytes(), "not printable ASCII"),
    ];

    for (key, expected) in cases {
        let response = app.post_raw("/v1/fine_tuning/jobs", &body, Some(key)).await;
        assert_error(
            &response,
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            &[expected, "1 to 255 printable ASCII characters"],
        );
    }
    assert_eq!(app.job_count().await, 0);
}

fn assert_unavailable(response: &TestResponse) {
    let body = String::from_utf8_lossy(&response.body);
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(response.headers[header::RETRY_AFTER], "5");
    let error = &response.json()["error"];
    assert_eq!(error["type"], "server_error", "{body}");
    assert_eq!(error["code"], "service_unavailable", "{body}");
    assert_eq!(error["param"], Value::Null, "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("retry after 5 seconds"), "{message}");
}

/// Rebuilds `app` on `store`, keeping its artifact folder and models.
fn with_store(app: TestApp, store: Arc<dyn Store>) -> TestApp {
    let mut services = app.services.clone();
    services.store = store;
    TestApp {
        router: studio_api::app(services.clone()),
        services,
        _dir: app._dir,
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn closed_sqlite_pool_answers_503(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let url = studio_store::sqlite_url(dir.path());
    studio_store::migrate(&url).await.unwrap();
    let store = SqliteStore::open(
        &dir.path().join(studio_store::SQLITE_FILE_NAME),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    store.pool().close().await;
    let app = with_store(test_app(pool), Arc::new(store));

    let list = app.get("/v1/fine_tuning/jobs").await;
    let get = app.get("/v1/fine_tuning/jobs/ftjob-x").await;

    assert_unavailable(&list);
    assert_unavailable(&get);
}

/// Returns a URL on a loopback port that nothing listens on.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("postgres://postgres@127.0.0.1:{port}/studio")
}

#[sqlx::test(migrations = "../../migrations")]
async fn unreachable_postgres_answers_503_within_seconds(pool: PgPool) {
    let unreachable = PgPoolOptions::new()
        .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
        .connect_lazy(&closed_port_url())
        .unwrap();
    let store = PgStore::new(unreachable, Arc::new(SystemClock));
    let app = with_store(test_app(pool), Arc::new(store));

    let started = Instant::now();
    let response = app.get("/v1/fine_tuning/jobs").await;
    let elapsed = started.elapsed();

    assert_unavailable(&response);
    assert!(
        elapsed < POSTGRES_ACQUIRE_TIMEOUT + OUTAGE_SLACK,
        "the 503 took {elapsed:?}"
    );
}

#[tokio::test]
async fn unreachable_postgres_fails_connect_within_seconds() {
    let started = Instant::now();
    let err = studio_store::migrate(&closed_port_url()).await.unwrap_err();
    let elapsed = started.elapsed();

    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        elapsed < POSTGRES_ACQUIRE_TIMEOUT + OUTAGE_SLACK,
        "connecting took {elapsed:?}"
    );
}
