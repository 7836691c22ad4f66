//! `POST /v1/chat/completions` on a tiny random model folder, on a fully fine-tuned folder and on
//! SmolLM2 with an adapter.

use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use candle_core::Device;
use serde_json::{json, Value};
use sqlx::PgPool;
use studio_core::dataset::{Message, Role};
use studio_core::JobId;
use studio_train::generate::{ChatModel, SamplingParams};

use super::{link_real_model, test_app, TestApp, TestResponse};

/// Writes the tiny chat model folder `tiny-chat` into the app's models folder.
fn add_tiny_chat_model(app: &TestApp) -> PathBuf {
    let dir = app.services.models.dir().join("tiny-chat");
    studio_train::tiny::write_tiny_model_folder(&dir, "llama", 21).unwrap();
    dir
}

fn hello() -> Value {
    json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
}

/// Computes the greedy reply to [`hello`] directly with the trainer's generation.
fn expected_reply(path: &Path, adapter: Option<&Path>, max_new_tokens: usize) -> String {
    let device = Device::Cpu;
    let loaded = studio_train::loader::load_model(path, &device).unwrap();
    let chat = ChatModel::from_loaded(&loaded, adapter, &device).unwrap();
    let messages =
        [(Role::System, "Be brief."), (Role::User, "Hello there")].map(|(role, content)| Message {
            role,
            content: content.into(),
            weight: None,
        });
    let params = SamplingParams {
        max_new_tokens,
        ..SamplingParams::default()
    };
    chat.reply(&messages, &params, &[], &mut |_| {})
        .unwrap()
        .text
}

fn assert_ok(response: &TestResponse) {
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn chat_completion_has_openai_shape(pool: PgPool) {
    let app = test_app(pool);
    let dir = add_tiny_chat_model(&app);

    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": "tiny-chat", "messages": hello(), "max_tokens": 6, "temperature": 0}),
        )
        .await;

    assert_ok(&response);
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], "tiny-chat");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected_reply(&dir, None, 6));
    let completion_tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(
        (finish == "length" && completion_tokens == 6)
            || (finish == "stop" && completion_tokens < 6),
        "finish_reason {finish} after {completion_tokens} tokens"
    );
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 10, "prompt_tokens {prompt_tokens}");
    assert_eq!(
        body["usage"]["total_tokens"].as_u64().unwrap(),
        prompt_tokens + completion_tokens
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn chat_completion_streams_chunks(pool: PgPool) {
    let app = test_app(pool);
    add_tiny_chat_model(&app);
    let request =
        json!({"model": "tiny-chat", "messages": hello(), "max_tokens": 8, "temperature": 0});

    let whole = app.post_json("/v1/chat/completions", request.clone()).await;
    let mut streamed_request = request;
    streamed_request["stream"] = json!(true);
    let streamed = app
        .post_json("/v1/chat/completions", streamed_request)
        .await;

    assert_ok(&whole);
    assert_ok(&streamed);
    let content_type = streamed.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let text = String::from_utf8(streamed.body.clone()).unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|item| serde_json::from_str(item).unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{text}");
    assert!(
        chunks
            .iter()
            .all(|chunk| chunk["object"] == "chat.completion.chunk"),
        "{text}"
    );
    assert!(
        chunks.iter().all(|chunk| chunk["id"] == chunks[0]["id"]),
        "{text}"
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        content,
        whole.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    let last = &chunks[chunks.len() - 1]["choices"][0];
    assert_eq!(
        last["finish_reason"],
        whole.json()["choices"][0]["finish_reason"]
    );
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|chunk| chunk["choices"][0]["finish_reason"].is_null()));
}

#[sqlx::test(migrations = "../../migrations")]
async fn chat_completion_rejects_bad_requests(pool: PgPool) {
    let app = test_app(pool);
    add_tiny_chat_model(&app);
    let cases = [
        (
            json!({"model": "no-such-model", "messages": hello()}),
            StatusCode::NOT_FOUND,
            "model",
            "/v1/models",
        ),
        (
            json!({"model": "tiny-chat", "messages": []}),
            StatusCode::BAD_REQUEST,
            "messages",
            "messages is empty",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "temperature": 2.5}),
            StatusCode::BAD_REQUEST,
            "temperature",
            "temperature 2.5",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "top_p": 0}),
            StatusCode::BAD_REQUEST,
            "top_p",
            "top_p 0",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "max_tokens": 0}),
            StatusCode::BAD_REQUEST,
            "max_tokens",
            "max_tokens 0",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "max_completion_tokens": 100000}),
            StatusCode::BAD_REQUEST,
            "max_tokens",
            "context",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "max_completion_tokens": 100000, "stream": true}),
            StatusCode::BAD_REQUEST,
            "max_tokens",
            "context",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "max_tokens": u64::MAX}),
            StatusCode::BAD_REQUEST,
            "max_tokens",
            "context",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "max_completion_tokens": u64::MAX, "stream": true}),
            StatusCode::BAD_REQUEST,
            "max_tokens",
            "context",
        ),
        (
            json!({"model": "tiny-chat", "messages": hello(), "n": 2}),
            StatusCode::BAD_REQUEST,
            "n",
            "n 2",
        ),
        (
            json!({"model": "tiny-chat", "messages": [{"role": "tool", "content": "x"}]}),
            StatusCode::BAD_REQUEST,
            "messages[0]",
            "\"tool\"",
        ),
        (
            json!({"messages": hello()}),
            StatusCode::BAD_REQUEST,
            "",
            "model",
        ),
    ];
    for (body, status, param, fragment) in cases {
        let response = app.post_json("/v1/chat/completions", body.clone()).await;
        assert_eq!(
            response.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&response.body)
        );
        if !param.is_empty() {
            assert_eq!(response.json()["error"]["param"], param, "{body}");
        }
        let message = response.error_message();
        assert!(message.contains(fragment), "{body}: {message}");
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn chat_completion_serves_full_fine_tuned_folder(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let created = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "tiny", "training_file": file_id, "training_type": {"type": "full"}}),
        )
        .await;
    let id = JobId::parse(created.json()["id"].as_str().unwrap()).unwrap();
    let store = &app.services.store;
    store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let folder = tempfile::tempdir().unwrap();
    studio_train::tiny::write_tiny_model_folder(folder.path(), "qwen2", 5).unwrap();
    let prefix = studio_store::keys::final_artifact_prefix(&id, "model");
    app.services
        .artifacts
        .put_dir(&prefix, folder.path())
        .await
        .unwrap();
    let name = format!("ft:tiny:studio:{id}");
    store.complete_job(&id, "w1", &name, 10).await.unwrap();

    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": name, "messages": hello(), "max_tokens": 5, "temperature": 0}),
        )
        .await;

    assert_ok(&response);
    let content = &response.json()["choices"][0]["message"]["content"];
    assert_eq!(content, &json!(expected_reply(folder.path(), None, 5)));
}

#[sqlx::test(migrations = "../../migrations")]
async fn chat_completion_applies_job_adapter(pool: PgPool) {
    let app = test_app(pool);
    link_real_model(&app);
    let file_id = app.uploaded_file_id().await;
    let created = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "smollm2-135m-instruct", "training_file": file_id}),
        )
        .await;
    let id = JobId::parse(created.json()["id"].as_str().unwrap()).unwrap();
    let store = &app.services.store;
    store
        .claim_job("w1", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let adapter =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/reference_adapter");
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let bytes = std::fs::read(adapter.join(name)).unwrap();
        app.services
            .artifacts
            .put_bytes(&studio_store::keys::final_adapter_key(&id, name), &bytes)
            .await
            .unwrap();
    }
    let name = format!("ft:smollm2-135m-instruct:studio:{id}");
    store.complete_job(&id, "w1", &name, 99).await.unwrap();

    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": name, "messages": hello(), "max_tokens": 8, "temperature": 0}),
        )
        .await;

    assert_ok(&response);
    let base = app
        .services
        .models
        .resolve("smollm2-135m-instruct")
        .unwrap()
        .path;
    let content = &response.json()["choices"][0]["message"]["content"];
    assert_eq!(content, &json!(expected_reply(&base, Some(&adapter), 8)));
}

#[sqlx::test(migrations = "../../migrations")]
async fn chat_completion_default_limit_fits_context(pool: PgPool) {
    let app = test_app(pool);
    add_tiny_chat_model(&app);

    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": "tiny-chat", "messages": hello(), "temperature": 0}),
        )
        .await;

    assert_ok(&response);
    let total = response.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(
        total <= 64,
        "{total} tokens do not fit the tiny model's context of 64"
    );
}
