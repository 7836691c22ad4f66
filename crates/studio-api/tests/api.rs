//! The API through `app(services)` without a socket, against a real Postgres.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use sqlx::PgPool;
use studio_core::JobId;
use studio_store::{ArtifactStore, ModelCatalog, PgStore, Services, SystemClock};
use tower::ServiceExt;

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
        let boundary = "studio-test-boundary";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
        );
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/files")
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
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
        let folder = self.services.artifacts.root().join("files");
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
        ("{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}\n".to_owned(), "line 1: no assistant turn"),
        (
            "{\"messages\":[{\"role\":\"assistant\",\"content\":\"x\"},{\"role\":\"user\",\"content\":\"y\"}]}\n".to_owned(),
            "line 1: the last turn is from the user",
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
async fn create_dpo_job_is_not_supported_yet(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;

    let response = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "tiny", "training_file": file_id, "method": {"type": "dpo"}}),
        )
        .await;

    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert!(response.error_message().contains("not supported yet"));
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
            valid_loss: None,
            learning_rate: 1e-4,
            grad_norm: 1.0,
            tokens_per_second: 50.0,
            trained_tokens: step * 10,
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
