//! `POST /v1/fine_tuning/jobs` rejects a job whose model or training file does not exist.

use serde_json::{json, Value};

use crate::app::{error_message, TestApp};
use crate::data::MODEL;

const GOOD_LINE: &str = r#"{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}"#;

fn lora_job(model: &str, training_file: &str) -> Value {
    json!({
        "model": model,
        "training_file": training_file,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        "training_type": {"type": "lora", "r": 8, "alpha": 16},
    })
}

/// Asserts a 400 or 404 whose message names `value`. Either status is a client error that the
/// `openai` SDK does not retry, so the test accepts both.
async fn assert_rejected_naming(response: reqwest::Response, value: &str) {
    let status = response.status();
    let body: Value = response.json().await.expect("the error body is JSON");
    assert!(status == 400 || status == 404, "expected 400 or 404, got {status}: {body}");
    assert!(
        error_message(&body).contains(value),
        "the error does not name {value}: {body}"
    );
}

#[tokio::test]
async fn create_job_rejects_unknown_model() {
    let app = TestApp::spawn().await;
    let file_id = app.upload_ok("good.jsonl", &format!("{GOOD_LINE}\n{GOOD_LINE}\n")).await;

    let response = app.create_job(&lora_job("no-such-model", &file_id)).await;

    assert_rejected_naming(response, "no-such-model").await;
    app.stop().await;
}

#[tokio::test]
async fn create_job_rejects_unknown_file() {
    let app = TestApp::spawn().await;

    let response = app.create_job(&lora_job(MODEL, "file-doesnotexist")).await;

    assert_rejected_naming(response, "file-doesnotexist").await;
    app.stop().await;
}

#[tokio::test]
async fn models_lists_demo_model() {
    let app = TestApp::spawn().await;

    let models = app.get_json("/v1/models").await;

    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("/v1/models returns a list")
        .iter()
        .filter_map(|model| model["id"].as_str())
        .collect();
    assert!(ids.contains(&MODEL), "{MODEL} is not listed: {models}");
    app.stop().await;
}
