//! Creating DPO jobs: a preference file uploads in its own format, a DPO job echoes its resolved
//! beta, and each method rejects training and validation files in another method's format.

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

#[sqlx::test(migrations = "../../migrations")]
async fn validation_file_must_match_method(pool: PgPool) {
    let app = test_app(pool);
    let chat_file = app.uploaded_file_id().await;
    let pairs = app.upload("pairs.jsonl", "fine-tune", PAIRS).await;
    let pairs_file = pairs.json()["id"].as_str().unwrap().to_owned();
    let prompts = app.upload("prompts.jsonl", "fine-tune", "{\"prompt\": \"Hi\"}\n").await;
    let prompts_file = prompts.json()["id"].as_str().unwrap().to_owned();
    let create = |training: &str, validation: &str, method: serde_json::Value| {
        json!({"model": "tiny", "training_file": training, "validation_file": validation, "method": method})
    };
    let distillation = json!({"type": "distillation", "distillation": {"teacher_model": "tiny"}});

    let dpo_with_chat = app
        .post_json("/v1/fine_tuning/jobs", create(&pairs_file, &chat_file, json!({"type": "dpo"})))
        .await;
    let dpo_with_pairs = app
        .post_json("/v1/fine_tuning/jobs", create(&pairs_file, &pairs_file, json!({"type": "dpo"})))
        .await;
    let supervised_with_pairs = app
        .post_json("/v1/fine_tuning/jobs", create(&chat_file, &pairs_file, json!({"type": "supervised"})))
        .await;
    let distillation_with_prompts = app
        .post_json("/v1/fine_tuning/jobs", create(&prompts_file, &prompts_file, distillation.clone()))
        .await;
    let distillation_with_pairs = app
        .post_json("/v1/fine_tuning/jobs", create(&pairs_file, &chat_file, distillation))
        .await;

    assert_eq!(dpo_with_chat.status, StatusCode::BAD_REQUEST);
    assert_eq!(dpo_with_chat.json()["error"]["param"], "validation_file");
    assert_eq!(dpo_with_chat.json()["error"]["code"], "invalid_validation_file");
    assert!(dpo_with_chat.error_message().contains("a DPO job needs preference pairs"), "{}", dpo_with_chat.error_message());
    assert_eq!(dpo_with_pairs.status, StatusCode::OK, "{}", dpo_with_pairs.json());
    assert_eq!(dpo_with_pairs.json()["validation_file"], pairs_file.as_str());
    assert_eq!(supervised_with_pairs.status, StatusCode::BAD_REQUEST);
    assert_eq!(supervised_with_pairs.json()["error"]["param"], "validation_file");
    assert_eq!(distillation_with_prompts.status, StatusCode::BAD_REQUEST);
    assert_eq!(distillation_with_prompts.json()["error"]["param"], "validation_file");
    assert!(
        distillation_with_prompts.error_message().contains("prompts without replies"),
        "{}",
        distillation_with_prompts.error_message()
    );
    assert_eq!(distillation_with_pairs.status, StatusCode::BAD_REQUEST);
    assert_eq!(distillation_with_pairs.json()["error"]["param"], "training_file");
    assert!(
        distillation_with_pairs.error_message().contains("contains preference pairs"),
        "{}",
        distillation_with_pairs.error_message()
    );
}

/// Counts the tokens of `text` for the tiny model's byte-level tokenizer: one per byte, and one
/// per special token.
fn byte_level_tokens(text: &str) -> usize {
    let specials = text.matches("<|im_start|>").count() + text.matches("<|im_end|>").count();
    specials + text.replace("<|im_start|>", "").replace("<|im_end|>", "").len()
}

#[sqlx::test(migrations = "../../migrations")]
async fn dpo_estimate_counts_pairs(pool: PgPool) {
    let app = test_app(pool);
    studio_train::tiny::write_tiny_model_folder(&app.services.models.dir().join("tiny-folder"), "llama", 5).unwrap();
    // The last pair's replies differ only after their first 40 tokens, which is all that
    // max_seq_len 80 leaves them after a 60-token prompt. The other pairs fit whole.
    let (same_chosen, same_rejected) = (format!("{}yes", "A".repeat(50)), format!("{}no", "A".repeat(50)));
    let pairs = [("Hi", "Hello!", "Go away."), ("Bye", "Goodbye!", "Whatever."), ("Sky?", "Blue.", "Green."), ("Same?", &same_chosen, &same_rejected)];
    let lines: Vec<String> = pairs
        .iter()
        .map(|(prompt, chosen, rejected)| json!({"prompt": prompt, "chosen": chosen, "rejected": rejected}).to_string())
        .collect();
    let upload = app.upload("pairs.jsonl", "fine-tune", &lines.join("\n")).await;
    let file_id = upload.json()["id"].as_str().unwrap().to_owned();

    let body = json!({"model": "tiny-folder", "training_file": file_id, "measure_steps": 1,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 2, "max_seq_len": 80}}}});
    let response = app.post_json("/v1/fine_tuning/estimate", body).await;
    let estimate = response.json();

    // Each pair is scored twice: its prompt before the chosen reply and before the rejected
    // one, each reply ending with <|im_end|>.
    let prompt_tokens = |prompt: &str| {
        byte_level_tokens(&format!(
            "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ))
    };
    let expected_tokens: usize = pairs[..3]
        .iter()
        .map(|(prompt, chosen, rejected)| 2 * prompt_tokens(prompt) + chosen.len() + 1 + rejected.len() + 1)
        .sum();
    assert_eq!(response.status, StatusCode::OK, "{estimate}");
    assert_eq!(estimate["method"], "dpo");
    assert_eq!(estimate["examples"], 3);
    assert_eq!(estimate["dropped_examples"], 1, "the pair with identical truncated replies is dropped");
    assert_eq!(estimate["held_out_examples"], 0);
    assert_eq!(estimate["tokens_per_epoch"], expected_tokens);
    assert_eq!(estimate["steps_per_epoch"], 2);
    assert_eq!(estimate["total_steps"], 4);
    assert!(estimate["seconds_per_step"].as_f64().is_some_and(|s| s > 0.0), "{estimate}");
    let warnings = estimate["warnings"].to_string();
    assert!(warnings.contains("Dropped 1 pair"), "{warnings}");
}
