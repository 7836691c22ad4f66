//! `POST /v1/files` rejects a dataset with a bad line, with 400 and a message naming the line.

use reqwest::StatusCode;

use crate::app::{error_message, expect_status, TestApp};

const GOOD_LINE: &str = r#"{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}"#;

/// Uploads a file whose line 1 is valid and line 2 is `bad_line`, and checks the rejection.
async fn assert_line_two_rejected(bad_line: &str) {
    let app = TestApp::spawn().await;
    let contents = format!("{GOOD_LINE}\n{bad_line}\n{GOOD_LINE}\n");

    let response = app.upload("bad.jsonl", &contents).await;

    let body = expect_status(response, StatusCode::BAD_REQUEST, "POST /v1/files").await;
    let message = error_message(&body).to_lowercase();
    assert!(message.contains("line 2"), "the error does not name line 2: {message}");
    app.stop().await;
}

#[tokio::test]
async fn upload_rejects_invalid_json() {
    assert_line_two_rejected(r#"{"messages": [{"role": "user""#).await;
}

#[tokio::test]
async fn upload_rejects_unknown_format() {
    assert_line_two_rejected(r#"{"question": "What is 2 + 2?", "answer": "4"}"#).await;
}

#[tokio::test]
async fn upload_rejects_missing_content() {
    assert_line_two_rejected(r#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "Hi!"}]}"#).await;
}

#[tokio::test]
async fn upload_rejects_null_content() {
    assert_line_two_rejected(r#"{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "Hi!"}]}"#).await;
}

#[tokio::test]
async fn upload_rejects_empty_assistant_content() {
    assert_line_two_rejected(r#"{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": ""}]}"#).await;
}

#[tokio::test]
async fn upload_accepts_valid_dataset() {
    let app = TestApp::spawn().await;

    let file_id = app.upload_ok("good.jsonl", &format!("{GOOD_LINE}\n{GOOD_LINE}\n")).await;

    let file = app.get_json(&format!("/v1/files/{file_id}")).await;
    assert_eq!(file["id"], file_id.as_str());
    assert_eq!(file["purpose"], "fine-tune");
    app.stop().await;
}
