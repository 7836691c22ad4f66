//! The API through `app(services)` against a real Postgres, mostly without a socket. The event
//! stream cases in `api/event_stream.rs` serve it on a loopback socket over Postgres and SQLite.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use sqlx::PgPool;
use studio_core::JobId;
use studio_store::{ArtifactStore, ModelCatalog, PgStore, Services, SystemClock};
use tower::ServiceExt;

#[path = "api/event_stream.rs"]
mod event_stream;

#[path = "api/chat_completions.rs"]
mod chat_completions;

#[path = "api/distillation.rs"]
mod distillation;

#[path = "api/dpo.rs"]
mod dpo;

#[path = "api/queue_controls.rs"]
mod queue_controls;

const CHAT_LINE: &str =
    r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]}"#;

struct TestApp {
    router: Router,
    services: Services,
    _dir: tempfile::TempDir,
}

struct TestResponse {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl TestResponse {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    fn error_message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

fn test_app(pool: PgPool) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::fs::write(dir.path().join("models/tiny.gguf"), b"GGUF").unwrap();
    let services = Services {
        store: Arc::new(PgStore::new(pool, Arc::new(SystemClock))),
        artifacts: Arc::new(ArtifactStore::new(dir.path().join("artifacts"))),
        models: ModelCatalog::new(dir.path().join("models")),
    };
    TestApp {
        router: studio_api::app(services.clone()),
        services,
        _dir: dir,
    }
}

impl TestApp {
    async fn send(&self, request: Request<Body>) -> TestResponse {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        TestResponse {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str) -> TestResponse {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post_json(&self, uri: &str, body: Value) -> TestResponse {
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        self.send(request).await
    }

    async fn upload(&self, filename: &str, purpose: &str, content: &str) -> TestResponse {
        self.upload_with_key(filename, purpose, content, None).await
    }

    async fn upload_with_key(&self, filename: &str, purpose: &str, content: &str, key: Option<&str>) -> TestResponse {
        let boundary = "studio-test-boundary";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
        );
        let mut request = Request::builder()
            .method(Method::POST)
            .uri("/v1/files")
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            );
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(request.body(Body::from(body)).unwrap()).await
    }

    async fn uploaded_file_id(&self) -> String {
        let response = self
            .upload(
                "train.jsonl",
                "fine-tune",
                &format!("{CHAT_LINE}\n{CHAT_LINE}\n"),
            )
            .await;
        assert_eq!(
            response.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        response.json()["id"].as_str().unwrap().to_owned()
    }

    async fn created_job(&self, file_id: &str) -> Value {
        let response = self
            .post_json(
                "/v1/fine_tuning/jobs",
                json!({"model": "tiny", "training_file": file_id}),
            )
            .await;
        assert_eq!(
            response.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&response.body)
        );
        response.json()
    }

    fn artifact_files(&self) -> usize {
        let folder = self
            .services
            .artifacts
            .local_root()
            .expect("the test store is a local folder")
            .join("files");
        std::fs::read_dir(folder)
            .map(|entries| entries.count())
            .unwrap_or(0)
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn upload_registers_file(pool: PgPool) {
    let app = test_app(pool);
    let content = format!("{CHAT_LINE}\n\n{CHAT_LINE}\n");

    let response = app.upload("train.jsonl", "fine-tune", &content).await;
    let file = response.json();

    assert_eq!(response.status, StatusCode::OK);
    assert!(file["id"].as_str().unwrap().starts_with("file-"));
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], content.len());
    assert_eq!(file["filename"], "train.jsonl");
    assert_eq!(file["purpose"], "fine-tune");
    assert_eq!(file["status"], "processed");
    assert_eq!(file["format"], "chat");
    assert_eq!(file["line_count"], 2);
    assert_eq!(file["sha256"].as_str().unwrap().len(), 64);
}

#[sqlx::test(migrations = "../../migrations")]
async fn uploaded_content_round_trips(pool: PgPool) {
    let app = test_app(pool);
    let content = format!("{CHAT_LINE}\n");
    let id = app
        .upload("train.jsonl", "fine-tune", &content)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let fetched = app.get(&format!("/v1/files/{id}")).await;
    let downloaded = app.get(&format!("/v1/files/{id}/content")).await;

    assert_eq!(fetched.json()["id"], id);
    assert_eq!(downloaded.status, StatusCode::OK);
    assert_eq!(downloaded.body, content.as_bytes());
}

#[sqlx::test(migrations = "../../migrations")]
async fn bad_uploads_name_line_and_leave_nothing(pool: PgPool) {
    let app = test_app(pool);
    let cases = [
        (format!("{CHAT_LINE}\n{{oops\n"), "line 2: not valid JSON"),
        (format!("{CHAT_LINE}\n[1]\n"), "line 2: expected a JSON object"),
        ("{\"text\":\"hi\"}\n".to_owned(), "line 1: unknown format"),
        (format!("{CHAT_LINE}\n{CHAT_LINE}\n{{\"messages\":[{{\"role\":\"user\"}}]}}\n"), "line 3: missing required field 'messages[0].content'"),
        ("{\"prompt\":null,\"completion\":\"x\"}\n".to_owned(), "line 1: field 'prompt' is null"),
        ("{\"prompt\":1,\"completion\":\"x\"}\n".to_owned(), "line 1: field 'prompt' must be a string"),
        ("{\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}\n".to_owned(), "line 1: field 'messages[0].role' has unknown role"),
        (
            "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"assistant\",\"content\":\"\"}]}\n".to_owned(),
            "line 1: field 'messages[1].content' is an empty assistant response",
        ),
        (format!("{CHAT_LINE}\n{{\"prompt\":\"a\",\"completion\":\"b\"}}\n"), "line 2: this line is in the prompt_completion format"),
        ("\n\n".to_owned(), "the file has no examples"),
    ];

    for (content, expected) in cases {
        let response = app.upload("bad.jsonl", "fine-tune", &content).await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{expected}");
        assert_eq!(response.json()["error"]["param"], "file");
        let message = response.error_message();
        assert!(
            message.contains(expected),
            "expected {expected:?} in {message:?}"
        );
    }

    let listed = app.get("/v1/files").await.json();
    assert_eq!(
        listed["data"].as_array().unwrap().len(),
        0,
        "no bad file is registered"
    );
    assert_eq!(app.artifact_files(), 0, "no bad file is stored");
}

#[sqlx::test(migrations = "../../migrations")]
async fn upload_with_other_purpose_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let response = app
        .upload("train.jsonl", "assistants", &format!("{CHAT_LINE}\n"))
        .await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"]["param"], "purpose");
    assert_eq!(app.artifact_files(), 0);
}

#[sqlx::test(migrations = "../../migrations")]
async fn create_job_echoes_resolved_spec(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;

    let job = app.created_job(&file_id).await;

    assert!(job["id"].as_str().unwrap().starts_with("ftjob-"));
    assert_eq!(job["object"], "fine_tuning.job");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["model"], "tiny");
    assert_eq!(job["training_file"], file_id);
    assert_eq!(job["hyperparameters"]["n_epochs"], 3);
    assert_eq!(job["hyperparameters"]["batch_size"], 16);
    assert_eq!(job["method"]["type"], "supervised");
    assert_eq!(
        job["method"]["supervised"]["hyperparameters"]["learning_rate"],
        1e-4
    );
    assert_eq!(job["training_type"]["type"], "lora");
    assert_eq!(job["training_type"]["r"], 8);
    assert!(job["seed"].is_u64());
    assert_eq!(job["fine_tuned_model"], Value::Null);
    assert_eq!(job["finished_at"], Value::Null);
}

#[sqlx::test(migrations = "../../migrations")]
async fn create_job_with_unknown_model_lists_models(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;

    let response = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "huge", "training_file": file_id}),
        )
        .await;

    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"]["param"], "model");
    assert!(
        response
            .error_message()
            .contains("available base models: tiny"),
        "{}",
        response.error_message()
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn create_job_with_unknown_file_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let existing = app.uploaded_file_id().await;

    let response = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "tiny", "training_file": "file-missing"}),
        )
        .await;

    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"]["param"], "training_file");
    assert!(
        response.error_message().contains(&existing),
        "{}",
        response.error_message()
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn create_job_with_bad_hyperparameter_names_it(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let body = json!({
        "model": "tiny",
        "training_file": file_id,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}},
    });

    let response = app.post_json("/v1/fine_tuning/jobs", body).await;

    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json()["error"]["param"],
        "method.supervised.hyperparameters.batch_size"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_queued_job_then_again(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = app.created_job(&file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let first = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({}))
        .await;
    let second = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({}))
        .await;

    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["status"], "cancelled");
    assert!(first.json()["finished_at"].is_i64());
    assert_eq!(second.status, StatusCode::BAD_REQUEST);
    assert!(
        second.error_message().contains("already was cancelled"),
        "{}",
        second.error_message()
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_running_job_requests_stop(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = app.created_job(&file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.services
        .store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();

    let response = app
        .post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({}))
        .await;
    let job = app
        .services
        .store
        .get_job(&JobId::parse(&id).unwrap())
        .await
        .unwrap();

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["status"], "running");
    assert!(job.cancel_requested);
}

#[sqlx::test(migrations = "../../migrations")]
async fn unknown_job_is_not_found(pool: PgPool) {
    let app = test_app(pool);
    for uri in [
        "/v1/fine_tuning/jobs/ftjob-nope",
        "/v1/fine_tuning/jobs/garbage",
        "/v1/fine_tuning/jobs/ftjob-nope/events",
    ] {
        let response = app.get(uri).await;
        assert_eq!(response.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(response.json()["error"]["type"], "invalid_request_error");
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn jobs_paginate_with_after(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            app.created_job(&file_id).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids.reverse();

    let first = app.get("/v1/fine_tuning/jobs?limit=2").await.json();
    let after = first["data"][1]["id"].as_str().unwrap().to_owned();
    let second = app
        .get(&format!("/v1/fine_tuning/jobs?limit=2&after={after}"))
        .await
        .json();

    let page_ids = |page: &Value| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(first["object"], "list");
    assert_eq!(page_ids(&first), ids[..2]);
    assert_eq!(first["has_more"], true);
    assert_eq!(page_ids(&second), ids[2..]);
    assert_eq!(second["has_more"], false);
}

#[sqlx::test(migrations = "../../migrations")]
async fn list_limit_out_of_range_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let response = app.get("/v1/fine_tuning/jobs?limit=1000").await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.json()["error"]["param"], "limit");
}

#[sqlx::test(migrations = "../../migrations")]
async fn job_events_are_listed(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = app.created_job(&file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.post_json(&format!("/v1/fine_tuning/jobs/{id}/cancel"), json!({}))
        .await;

    let events = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/events?limit=1"))
        .await
        .json();

    assert_eq!(events["data"].as_array().unwrap().len(), 1);
    assert_eq!(events["has_more"], true);
    assert_eq!(events["data"][0]["object"], "fine_tuning.job.event");
    assert!(events["data"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("ftevent-"));
    assert!(events["data"][0]["message"]
        .as_str()
        .unwrap()
        .contains("cancelled"));
}

#[sqlx::test(migrations = "../../migrations")]
async fn download_before_success_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = app.created_job(&file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let not_ready = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{id}/download?artifact=adapter"
        ))
        .await;
    let unknown = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{id}/download?artifact=weights"
        ))
        .await;

    assert_eq!(not_ready.status, StatusCode::BAD_REQUEST);
    assert!(
        not_ready.error_message().contains("it is queued"),
        "{}",
        not_ready.error_message()
    );
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown.json()["error"]["param"], "artifact");
}

#[sqlx::test(migrations = "../../migrations")]
async fn download_streams_adapter_tar(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = JobId::parse(app.created_job(&file_id).await["id"].as_str().unwrap()).unwrap();
    let store = &app.services.store;
    store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let config = br#"{"peft_type":"LORA","r":8}"#;
    let weights = vec![7u8; 1000];
    app.services
        .artifacts
        .put_bytes(
            &studio_store::keys::final_adapter_key(&id, "adapter_config.json"),
            config,
        )
        .await
        .unwrap();
    app.services
        .artifacts
        .put_bytes(
            &studio_store::keys::final_adapter_key(&id, "adapter_model.safetensors"),
            &weights,
        )
        .await
        .unwrap();
    store
        .complete_job(&id, "w1", &format!("ft:tiny:studio:{id}"), 99)
        .await
        .unwrap();

    let response = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{id}/download?artifact=adapter"
        ))
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        response.headers[header::CONTENT_LENGTH],
        response.body.len().to_string()
    );

    let mut archive = tar::Archive::new(response.body.as_slice());
    let mut entries = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
        entries.push((name, content));
    }
    assert_eq!(
        entries,
        vec![
            ("adapter_config.json".to_owned(), config.to_vec()),
            ("adapter_model.safetensors".to_owned(), weights)
        ]
    );

    let models = app.get("/v1/models").await.json();
    let model_ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        model_ids,
        ["tiny".to_owned(), format!("ft:tiny:studio:{id}")]
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn responses_carry_request_id(pool: PgPool) {
    let app = test_app(pool);

    let generated = app.get("/healthz").await;
    let given = app
        .send(
            Request::get("/healthz")
                .header("x-request-id", "abc-123")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let unknown = app.get("/v1/nothing").await;

    assert_eq!(generated.status, StatusCode::OK);
    assert!(!generated.headers["x-request-id"].is_empty());
    assert_eq!(given.headers["x-request-id"], "abc-123");
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert!(unknown.headers.contains_key("x-request-id"));
}

#[sqlx::test(migrations = "../../migrations")]
async fn metrics_are_listed_by_step(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = JobId::parse(app.created_job(&file_id).await["id"].as_str().unwrap()).unwrap();
    app.services
        .store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let points: Vec<_> = (1..=4)
        .map(|step| studio_store::MetricPoint {
            step,
            epoch: step as f64 / 4.0,
            train_loss: 3.0 - step as f64 * 0.5,
            train_mean_token_accuracy: None,
            valid_loss: None,
            valid_mean_token_accuracy: None,
            learning_rate: 1e-4,
            grad_norm: 1.0,
            tokens_per_second: 50.0,
            trained_tokens: step * 10,
            rewards: None,
        })
        .collect();
    app.services
        .store
        .insert_metrics(&id, "w1", &points)
        .await
        .unwrap();

    let all = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/metrics"))
        .await
        .json();
    let sampled = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/metrics?max_points=2"))
        .await
        .json();

    let steps = |page: &Value| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(steps(&all), [1, 2, 3, 4]);
    assert_eq!(all["data"][1]["train_loss"], 2.0);
    assert_eq!(steps(&sampled), [1, 4]);
}

/// Every operation in openapi.yaml reaches a handler of the router, not the unknown-route fallback.
#[sqlx::test(migrations = "../../migrations")]
async fn openapi_operations_are_routed(pool: PgPool) {
    let app = test_app(pool);
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.yaml"))
        .unwrap();
    let mut operations = Vec::new();
    let mut path = None;
    for line in spec
        .lines()
        .skip_while(|line| *line != "paths:")
        .take_while(|line| *line != "components:")
    {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = Some(
                format!("/{p}")
                    .replace("{file_id}", "file-x")
                    .replace("{job_id}", "ftjob-x"),
            );
        } else if let Some(method) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':')) {
            if ["get", "post", "delete"].contains(&method) {
                operations.push((method.to_uppercase(), path.clone().unwrap()));
            }
        }
    }
    assert!(operations.len() >= 13, "parsed only {operations:?}");

    for (method, uri) in operations {
        let request = Request::builder()
            .method(method.as_str())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let response = app.send(request).await;
        let routed = response.status != StatusCode::NOT_FOUND
            || !response.error_message().starts_with("unknown route");
        assert!(routed, "{method} {uri} is documented but not routed");
    }
}

/// Claims the queued job `id` as worker `w1` and registers a LoRA checkpoint at each step, with
/// adapter files, optimizer state and trainer state uploaded as the worker stores them.
async fn job_with_checkpoints(app: &TestApp, id: &JobId, steps: &[u64]) -> Vec<String> {
    let store = &app.services.store;
    store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let mut ids = Vec::new();
    for &step in steps {
        let prefix = studio_store::keys::checkpoint_prefix(id, step);
        for (name, content) in [
            ("adapter_config.json", format!("{{\"step\":{step}}}")),
            ("adapter_model.safetensors", format!("weights at {step}")),
            ("optimizer.safetensors", "moments".to_owned()),
            ("trainer_state.json", "{}".to_owned()),
        ] {
            app.services
                .artifacts
                .put_bytes(&format!("{prefix}/{name}"), content.as_bytes())
                .await
                .unwrap();
        }
        let checkpoint = studio_store::NewCheckpoint {
            id: studio_core::CheckpointId::new(),
            job_id: id.clone(),
            step,
            metrics: json!({"step": step, "train_loss": 1.0, "valid_loss": null}),
            artifact_key: prefix,
        };
        let saved = store.insert_checkpoint("w1", &checkpoint).await.unwrap();
        ids.push(saved.id.to_string());
    }
    ids
}

fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    let mut entries = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
        entries.push((name, content));
    }
    entries
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoints_are_listed_newest_first(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = JobId::parse(app.created_job(&file_id).await["id"].as_str().unwrap()).unwrap();
    let ids = job_with_checkpoints(&app, &id, &[5, 10, 15]).await;

    let first = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints?limit=2"))
        .await
        .json();
    let after = first["data"][1]["id"].as_str().unwrap().to_owned();
    let second = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{id}/checkpoints?limit=2&after={after}"
        ))
        .await
        .json();
    let newest = &first["data"][0];

    assert_eq!(first["object"], "list");
    assert_eq!(first["has_more"], true);
    assert_eq!(newest["object"], "fine_tuning.job.checkpoint");
    assert_eq!(newest["id"], ids[2]);
    assert_eq!(newest["step_number"], 15);
    assert_eq!(newest["fine_tuning_job_id"], id.as_str());
    assert_eq!(
        newest["fine_tuned_model_checkpoint"],
        format!("ft:tiny:studio:{id}:ckpt-step-15")
    );
    assert_eq!(newest["metrics"]["train_loss"], 1.0);
    assert!(newest["created_at"].is_i64());
    assert_eq!(first["data"][1]["step_number"], 10);
    assert_eq!(second["data"].as_array().unwrap().len(), 1);
    assert_eq!(second["data"][0]["step_number"], 5);
    assert_eq!(second["has_more"], false);
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoint_download_serves_adapter_only(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = JobId::parse(app.created_job(&file_id).await["id"].as_str().unwrap()).unwrap();
    let ids = job_with_checkpoints(&app, &id, &[3, 6]).await;

    let response = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{id}/download?artifact=adapter&checkpoint={}",
            ids[0]
        ))
        .await;
    let merged = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{id}/download?artifact=merged&checkpoint={}",
            ids[0]
        ))
        .await;
    let unknown = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{id}/download?checkpoint=ftckpt-nope"
        ))
        .await;

    assert_eq!(
        response.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(
        response.headers[header::CONTENT_LENGTH],
        response.body.len().to_string()
    );
    assert_eq!(
        untar(&response.body),
        vec![
            ("adapter_config.json".to_owned(), b"{\"step\":3}".to_vec()),
            (
                "adapter_model.safetensors".to_owned(),
                b"weights at 3".to_vec()
            ),
        ]
    );
    assert_eq!(merged.status, StatusCode::BAD_REQUEST);
    assert_eq!(merged.json()["error"]["param"], "artifact");
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["error"]["param"], "checkpoint");
}

#[sqlx::test(migrations = "../../migrations")]
async fn artifact_the_job_lacks_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let lora = app.created_job(&file_id).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let full = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "tiny", "training_file": file_id, "training_type": {"type": "full"}}),
        )
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let model_of_lora = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{lora}/download?artifact=model"
        ))
        .await;
    let adapter_of_full = app
        .get(&format!(
            "/v1/fine_tuning/jobs/{full}/download?artifact=adapter"
        ))
        .await;

    assert_eq!(model_of_lora.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        model_of_lora.json()["error"]["code"],
        "artifact_not_available"
    );
    assert!(
        model_of_lora
            .error_message()
            .contains("it has: adapter, merged"),
        "{}",
        model_of_lora.error_message()
    );
    assert_eq!(adapter_of_full.status, StatusCode::BAD_REQUEST);
    assert!(
        adapter_of_full.error_message().contains("it has: model"),
        "{}",
        adapter_of_full.error_message()
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn full_job_downloads_sharded_model(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let response = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "tiny", "training_file": file_id, "training_type": {"type": "full"}}),
        )
        .await;
    let id = JobId::parse(response.json()["id"].as_str().unwrap()).unwrap();
    let store = &app.services.store;
    store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let prefix = studio_store::keys::final_artifact_prefix(&id, "model");
    let files = [
        ("config.json", b"{}".to_vec()),
        ("model-00001-of-00002.safetensors", vec![1u8; 700]),
        ("model-00002-of-00002.safetensors", vec![2u8; 300]),
        (
            "model.safetensors.index.json",
            b"{\"weight_map\":{}}".to_vec(),
        ),
    ];
    for (name, content) in &files {
        app.services
            .artifacts
            .put_bytes(&format!("{prefix}/{name}"), content)
            .await
            .unwrap();
    }
    store
        .complete_job(&id, "w1", &format!("ft:tiny:studio:{id}"), 10)
        .await
        .unwrap();

    let response = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/download"))
        .await;

    assert_eq!(response.status, StatusCode::OK);
    let expected: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(name, content)| (name.to_string(), content.clone()))
        .collect();
    assert_eq!(untar(&response.body), expected);
}

#[sqlx::test(migrations = "../../migrations")]
async fn metrics_include_token_accuracy(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let id = JobId::parse(app.created_job(&file_id).await["id"].as_str().unwrap()).unwrap();
    app.services
        .store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let point = |step: u64, valid: Option<(f64, f64)>| studio_store::MetricPoint {
        step,
        epoch: 0.5,
        train_loss: 2.0,
        train_mean_token_accuracy: Some(0.25),
        valid_loss: valid.map(|v| v.0),
        valid_mean_token_accuracy: valid.map(|v| v.1),
        learning_rate: 1e-4,
        grad_norm: 1.0,
        tokens_per_second: 10.0,
        trained_tokens: step,
        rewards: (step == 2).then_some(studio_store::RewardMetrics {
            reward_chosen: 0.5,
            reward_rejected: -0.25,
            reward_accuracy: 1.0,
            reward_margin: 0.75,
        }),
    };
    app.services
        .store
        .insert_metrics(&id, "w1", &[point(1, None), point(2, Some((1.5, 0.75)))])
        .await
        .unwrap();

    let metrics = app
        .get(&format!("/v1/fine_tuning/jobs/{id}/metrics"))
        .await
        .json();

    assert_eq!(metrics["data"][0]["train_mean_token_accuracy"], 0.25);
    assert_eq!(metrics["data"][0]["valid_loss"], Value::Null);
    assert_eq!(metrics["data"][0]["valid_mean_token_accuracy"], Value::Null);
    assert_eq!(metrics["data"][1]["valid_loss"], 1.5);
    assert_eq!(metrics["data"][1]["valid_mean_token_accuracy"], 0.75);
    assert_eq!(metrics["data"][0]["reward_margin"], Value::Null);
    assert_eq!(metrics["data"][1]["reward_chosen"], 0.5);
    assert_eq!(metrics["data"][1]["reward_rejected"], -0.25);
    assert_eq!(metrics["data"][1]["reward_accuracy"], 1.0);
    assert_eq!(metrics["data"][1]["reward_margin"], 0.75);
}

/// Links the demo model into the test's models folder. Panics when it is missing, so a
/// machine without it fails the test instead of skipping it.
fn link_real_model(app: &TestApp) {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = std::env::var_os("STUDIO_TEST_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo.join("models"));
    let model = dir.join("smollm2-135m-instruct.gguf");
    assert!(
        model.is_file(),
        "the model file {} is missing: run `cargo run -p smart-studio -- fetch-model` at the repository root",
        model.display()
    );
    let link = app.services.models.dir().join("smollm2-135m-instruct.gguf");
    std::os::unix::fs::symlink(model.canonicalize().unwrap(), link).unwrap();
}

#[sqlx::test(migrations = "../../migrations")]
async fn estimate_counts_smollm2_lora_parameters(pool: PgPool) {
    let app = test_app(pool);
    link_real_model(&app);
    let file_id = app.uploaded_file_id().await;

    let response = app
        .post_json(
            "/v1/fine_tuning/estimate",
            json!({
                "model": "smollm2-135m-instruct",
                "training_file": file_id,
                "hyperparameters": {"n_epochs": 2, "batch_size": 1},
                "training_type": {"type": "lora", "r": 8},
                "measure_steps": 0,
            }),
        )
        .await;
    let estimate = response.json();

    assert_eq!(response.status, StatusCode::OK, "{estimate}");
    assert_eq!(estimate["object"], "fine_tuning.estimate");
    assert_eq!(estimate["trainable_parameters"], 921_600);
    let percent = estimate["trainable_percent"].as_f64().unwrap();
    assert!((percent - 0.685).abs() < 5e-4, "{percent}");
    assert_eq!(estimate["examples"], 2);
    assert_eq!(estimate["held_out_examples"], 0, "two examples are too few to hold any out");
    assert_eq!(estimate["steps_per_epoch"], 2);
    assert_eq!(estimate["total_steps"], 4);
    assert_eq!(estimate["seconds_per_step"], Value::Null);
    assert!(estimate["estimated_peak_memory_bytes"].as_u64().unwrap() > 0);
}

#[sqlx::test(migrations = "../../migrations")]
async fn estimate_validates_like_create(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;

    let bad_knob = app
        .post_json(
            "/v1/fine_tuning/estimate",
            json!({"model": "tiny", "training_file": file_id, "hyperparameters": {"warmup_ratio": 1}}),
        )
        .await;
    let bad_steps = app
        .post_json(
            "/v1/fine_tuning/estimate",
            json!({"model": "tiny", "training_file": file_id, "measure_steps": 6}),
        )
        .await;
    let unknown_model = app
        .post_json(
            "/v1/fine_tuning/estimate",
            json!({"model": "huge", "training_file": file_id}),
        )
        .await;

    assert_eq!(bad_knob.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad_knob.json()["error"]["param"],
        "hyperparameters.warmup_ratio"
    );
    assert_eq!(bad_steps.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_steps.json()["error"]["param"], "measure_steps");
    assert_eq!(unknown_model.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown_model.json()["error"]["param"], "model");
}

/// Asserts that a response is OpenAI's error envelope with all four fields.
fn assert_error_envelope(response: &TestResponse, what: &str) {
    let body = response.json();
    let error = &body["error"];
    assert!(error["message"].is_string(), "{what}: no message in {body}");
    assert!(error["type"].is_string(), "{what}: no type in {body}");
    assert!(error.get("param").is_some(), "{what}: no param in {body}");
    assert!(error.get("code").is_some(), "{what}: no code in {body}");
    assert!(
        response.headers.contains_key("x-request-id"),
        "{what}: no x-request-id"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn wrong_method_gets_error_envelope(pool: PgPool) {
    let app = test_app(pool);
    for (method, uri) in [
        (Method::DELETE, "/v1/files"),
        (Method::PUT, "/v1/fine_tuning/jobs"),
        (Method::POST, "/v1/fine_tuning/jobs/ftjob-x"),
    ] {
        let request = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let response = app.send(request).await;

        assert_eq!(
            response.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}"
        );
        assert_error_envelope(&response, uri);
        assert!(
            response.error_message().contains(method.as_str()),
            "{method} {uri}"
        );
        assert!(
            response.headers.contains_key(header::ALLOW),
            "{method} {uri}"
        );
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn non_utf8_path_id_is_not_found(pool: PgPool) {
    let app = test_app(pool);
    for uri in [
        "/v1/files/file-a%FF",
        "/v1/files/file-a%FF/content",
        "/v1/fine_tuning/jobs/ftjob-%C3%28",
        "/v1/fine_tuning/jobs/ftjob-%FF/events",
    ] {
        let response = app.get(uri).await;

        assert_eq!(response.status, StatusCode::NOT_FOUND, "{uri}");
        assert_error_envelope(&response, uri);
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn metadata_with_nul_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    for metadata in [json!({"team": "a\u{0}b"}), json!({"te\u{0}am": "ab"})] {
        let response = app
            .post_json(
                "/v1/fine_tuning/jobs",
                json!({"model": "tiny", "training_file": file_id, "metadata": metadata}),
            )
            .await;

        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{metadata}");
        assert_error_envelope(&response, "metadata");
        assert!(response.error_message().contains("NUL"), "{metadata}");
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn list_after_id_with_nul_is_not_found(pool: PgPool) {
    let app = test_app(pool);
    for uri in [
        "/v1/files?after=file-%00",
        "/v1/fine_tuning/jobs?after=ftjob-%00",
    ] {
        let response = app.get(uri).await;

        assert_eq!(response.status, StatusCode::NOT_FOUND, "{uri}");
        assert_error_envelope(&response, uri);
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn oversized_json_body_gets_413_envelope(pool: PgPool) {
    let app = test_app(pool);
    let body =
        json!({"model": "tiny", "metadata": {"a": "x".repeat(studio_api::MAX_JSON_BODY_BYTES)}});
    for uri in ["/v1/fine_tuning/jobs", "/v1/fine_tuning/estimate"] {
        let response = app.post_json(uri, body.clone()).await;

        assert_eq!(response.status, StatusCode::PAYLOAD_TOO_LARGE, "{uri}");
        assert_error_envelope(&response, uri);
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn upload_may_exceed_json_body_limit(pool: PgPool) {
    let app = test_app(pool);
    let lines = studio_api::MAX_JSON_BODY_BYTES / CHAT_LINE.len() + 1;
    let content = format!("{CHAT_LINE}\n").repeat(lines);

    let response = app.upload("big.jsonl", "fine-tune", &content).await;

    assert_eq!(
        response.status,
        StatusCode::OK,
        "{}",
        response.error_message()
    );
    assert_eq!(response.json()["line_count"], lines);
}

#[sqlx::test(migrations = "../../migrations")]
async fn upload_filename_is_cleaned(pool: PgPool) {
    let app = test_app(pool);
    let long = "x".repeat(1000);
    let cases = [
        ("../../etc/passwd", "passwd".to_owned()),
        ("data/train.jsonl", "train.jsonl".to_owned()),
        ("tab\there.jsonl", "tabhere.jsonl".to_owned()),
        ("../", "upload.jsonl".to_owned()),
        (long.as_str(), "x".repeat(studio_api::MAX_FILENAME_BYTES)),
    ];
    for (sent, stored) in cases {
        let response = app
            .upload(sent, "fine-tune", &format!("{CHAT_LINE}\n"))
            .await;

        assert_eq!(response.status, StatusCode::OK, "{sent:?}");
        assert_eq!(response.json()["filename"], stored, "{sent:?}");
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn content_disposition_encodes_non_ascii_filename(pool: PgPool) {
    let app = test_app(pool);
    let uploaded = app
        .upload("été v2.jsonl", "fine-tune", &format!("{CHAT_LINE}\n"))
        .await;
    let id = uploaded.json()["id"].as_str().unwrap().to_owned();

    let response = app.get(&format!("/v1/files/{id}/content")).await;
    let disposition = response.headers[header::CONTENT_DISPOSITION]
        .to_str()
        .unwrap();

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        disposition,
        "attachment; filename=\"_t_ v2.jsonl\"; filename*=UTF-8''%C3%A9t%C3%A9%20v2.jsonl"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn upload_with_byte_order_mark_is_accepted(pool: PgPool) {
    let app = test_app(pool);
    let content = format!("\u{feff}{CHAT_LINE}\r\n{CHAT_LINE}\r\n");

    let response = app.upload("notepad.jsonl", "fine-tune", &content).await;

    assert_eq!(
        response.status,
        StatusCode::OK,
        "{}",
        response.error_message()
    );
    assert_eq!(response.json()["line_count"], 2);
    assert_eq!(response.json()["bytes"], content.len());
}

#[sqlx::test(migrations = "../../migrations")]
async fn malformed_limit_names_the_range(pool: PgPool) {
    let app = test_app(pool);
    for limit in ["-1", "abc", "99999999999999999999", "0", "1.5"] {
        let response = app.get(&format!("/v1/files?limit={limit}")).await;

        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{limit}");
        assert_eq!(response.json()["error"]["param"], "limit", "{limit}");
        assert!(
            response.error_message().contains("from 1 to 100"),
            "{limit}: {}",
            response.error_message()
        );
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn huge_rejected_value_is_not_echoed_whole(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let huge = "a".repeat(1_000_000);
    let cases = [
        (
            "suffix",
            json!({"model": "tiny", "training_file": file_id, "suffix": huge}),
        ),
        ("model", json!({"model": huge, "training_file": file_id})),
        (
            "training_file",
            json!({"model": "tiny", "training_file": format!("file-{huge}!")}),
        ),
        (
            "hyperparameters.n_epochs",
            json!({"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": huge}}),
        ),
        (
            "unknown key",
            json!({"model": "tiny", "training_file": file_id, huge.clone(): 1}),
        ),
    ];
    for (what, body) in cases {
        let response = app.post_json("/v1/fine_tuning/jobs", body).await;

        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{what}");
        assert!(
            response.body.len() < 2_000,
            "{what}: {} bytes",
            response.body.len()
        );
        assert!(
            response.error_message().contains(" characters)"),
            "{what}: {}",
            response.error_message()
        );
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn merged_model_is_built_on_first_download(pool: PgPool) {
    let app = test_app(pool);
    link_real_model(&app);
    let file_id = app.uploaded_file_id().await;
    let created = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "smollm2-135m-instruct", "training_file": file_id}),
        )
        .await
        .json();
    let id = JobId::parse(created["id"].as_str().unwrap()).unwrap();
    let store = &app.services.store;
    store.claim_job("w1", std::time::Duration::from_secs(60)).await.unwrap().unwrap();
    let adapter = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/reference_adapter");
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let bytes = std::fs::read(adapter.join(name)).unwrap();
        app.services
            .artifacts
            .put_bytes(&studio_store::keys::final_adapter_key(&id, name), &bytes)
            .await
            .unwrap();
    }
    store.complete_job(&id, "w1", &format!("ft:smollm2-135m-instruct:studio:{id}"), 99).await.unwrap();
    let stored = |app: &TestApp| {
        let dir = app
            .services
            .artifacts
            .local_root()
            .expect("the test store is a local folder")
            .join(format!("jobs/{id}/final/merged"));
        std::fs::read_dir(dir).map(|entries| entries.count()).unwrap_or(0)
    };
    assert_eq!(stored(&app), 0, "a job stores no merged model until it is requested");

    let response = app.get(&format!("/v1/fine_tuning/jobs/{id}/download?artifact=merged")).await;
    assert_eq!(response.status, StatusCode::OK, "{}", String::from_utf8_lossy(&response.body));
    assert!(stored(&app) >= 2, "the merged model is kept for later downloads");

    let mut archive = tar::Archive::new(response.body.as_slice());
    let mut files = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut content).unwrap();
        files.insert(name, content);
    }
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(files.contains_key(name), "the merged archive lacks {name}: {:?}", files.keys());
    }

    // The reference adapter has r 8 and alpha 16, so each adapted weight gains 2 · B A.
    let device = candle_core::Device::Cpu;
    let merged = candle_core::safetensors::load_buffer(&files["model.safetensors"], &device).unwrap();
    let base = studio_train::loader::load_model(&app.services.models.resolve("smollm2-135m-instruct").unwrap().path, &device).unwrap();
    let lora = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &device).unwrap();
    let key = "model.layers.0.self_attn.q_proj.weight";
    let a = &lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    let expected = (&base.weights[key] + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap();
    let difference = (&merged[key] - expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(difference < 1e-5, "merged {key} differs from W + 2 B A by {difference}");
}
