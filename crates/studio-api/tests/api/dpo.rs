//! Creating DPO jobs: a preference file uploads in its own format, a DPO job echoes its resolved
//! beta, and each method rejects the other's training file.

use axum::http::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use super::test_app;

const PAIRS: &str = concat!(
    r#"{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}"#,
    "\n",
    r#"{"input": {"messages": [{"role": "user", "content": "Bye"}]}, "preferred_output": [{"role": "assistant", "content": "Goodbye!"}], "non_preferred_output": [{"role": "assistant", "content": "Whatever."}]}"#,
    "\n"
);

#[sqlx::test(migrations = "../../migrations")]
async fn dpo_job_accepts_pairs_and_echoes_beta(pool: PgPool) {
    let app = test_app(pool);
    let upload = app.upload("pairs.jsonl", "fine-tune", PAIRS).await;
    assert_eq!(upload.status, StatusCode::OK, "{}", String::from_utf8_lossy(&upload.body));
    assert_eq!(upload.json()["format"], "preference");
    let file_id = upload.json()["id"].as_str().unwrap().to_owned();

    let body = json!({"model": "tiny", "training_file": file_id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "n_epochs": 2}}}});
    let response = app.post_json("/v1/fine_tuning/jobs", body).await;
    let job = response.json();

    assert_eq!(response.status, StatusCode::OK, "{job}");
    assert_eq!(job["method"]["type"], "dpo");
    assert_eq!(job["method"]["dpo"]["hyperparameters"]["beta"], 0.1);
    assert_eq!(job["method"]["dpo"]["hyperparameters"]["n_epochs"], 2);
    assert_eq!(job["hyperparameters"]["n_epochs"], 2);
}

#[sqlx::test(migrations = "../../migrations")]
async fn dpo_and_supervised_reject_each_others_files(pool: PgPool) {
    let app = test_app(pool);
    let chat_file = app.uploaded_file_id().await;
    let pairs = app.upload("pairs.jsonl", "fine-tune", PAIRS).await;
    let pairs_file = pairs.json()["id"].as_str().unwrap().to_owned();

    let dpo = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "tiny", "training_file": chat_file, "method": {"type": "dpo"}}),
        )
        .await;
    let supervised = app
        .post_json("/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": pairs_file}))
        .await;

    assert_eq!(dpo.status, StatusCode::BAD_REQUEST);
    assert_eq!(dpo.json()["error"]["param"], "training_file");
    assert!(dpo.error_message().contains("a DPO job needs preference pairs"), "{}", dpo.error_message());
    assert_eq!(supervised.status, StatusCode::BAD_REQUEST);
    assert!(supervised.error_message().contains("contains preference pairs"), "{}", supervised.error_message());
}

#[sqlx::test(migrations = "../../migrations")]
async fn preference_upload_names_line_and_field(pool: PgPool) {
    let app = test_app(pool);
    let missing = concat!(
        r#"{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}"#,
        "\n",
        r#"{"prompt": "Bye", "chosen": "Goodbye!"}"#,
        "\n"
    );
    let empty = r#"{"prompt": "Hi", "chosen": "", "rejected": "Go away."}"#;

    let missing = app.upload("pairs.jsonl", "fine-tune", missing).await;
    let empty = app.upload("pairs.jsonl", "fine-tune", empty).await;

    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing.error_message().contains("line 2: missing required field 'rejected'"), "{}", missing.error_message());
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert!(empty.error_message().contains("line 1: field 'chosen' is an empty response"), "{}", empty.error_message());
}
