//! Creating distillation jobs: the teacher is checked at create, and a prompts-only file is
//! accepted for distillation alone.

use axum::http::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use super::test_app;

fn distillation(teacher: &str) -> serde_json::Value {
    json!({"type": "distillation", "distillation": {"teacher_model": teacher,
        "hyperparameters": {"temperature": 3, "kd_weight": 0.25}}})
}

#[sqlx::test(migrations = "../../migrations")]
async fn distillation_with_unknown_teacher_is_rejected(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;

    let body = json!({"model": "tiny", "training_file": file_id, "method": distillation("huge")});
    let response = app.post_json("/v1/fine_tuning/jobs", body).await;
    let error = &response.json()["error"];

    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "method.distillation.teacher_model");
    assert!(response.error_message().contains("'huge'"), "{}", response.error_message());
}

#[sqlx::test(migrations = "../../migrations")]
async fn distillation_job_echoes_its_method(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;

    let body = json!({"model": "tiny", "training_file": file_id, "method": distillation("tiny")});
    let response = app.post_json("/v1/fine_tuning/jobs", body).await;
    let job = response.json();

    assert_eq!(response.status, StatusCode::OK, "{job}");
    assert_eq!(job["method"]["type"], "distillation");
    assert_eq!(job["method"]["distillation"]["teacher_model"], "tiny");
    assert_eq!(job["method"]["distillation"]["hyperparameters"]["temperature"], 3.0);
    assert_eq!(job["method"]["distillation"]["hyperparameters"]["kd_weight"], 0.25);
    assert_eq!(job["method"]["distillation"]["hyperparameters"]["n_epochs"], 3);
}

#[sqlx::test(migrations = "../../migrations")]
async fn prompts_file_is_for_distillation_only(pool: PgPool) {
    let app = test_app(pool);
    let upload = app
        .upload("prompts.jsonl", "fine-tune", "{\"prompt\": \"Hi\"}\n{\"prompt\": \"Bye\"}\n")
        .await;
    assert_eq!(upload.status, StatusCode::OK, "{}", String::from_utf8_lossy(&upload.body));
    assert_eq!(upload.json()["format"], "prompts");
    let file_id = upload.json()["id"].as_str().unwrap().to_owned();

    let supervised = app
        .post_json("/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": file_id}))
        .await;
    let distilled = app
        .post_json(
            "/v1/fine_tuning/jobs",
            json!({"model": "tiny", "training_file": file_id, "method": distillation("tiny")}),
        )
        .await;

    assert_eq!(supervised.status, StatusCode::BAD_REQUEST);
    assert_eq!(supervised.json()["error"]["code"], "invalid_training_file");
    assert!(supervised.error_message().contains("prompts without replies"), "{}", supervised.error_message());
    assert_eq!(distilled.status, StatusCode::OK, "{}", String::from_utf8_lossy(&distilled.body));
}

#[sqlx::test(migrations = "../../migrations")]
async fn student_layers_beyond_model_are_rejected(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    // The tiny model folder has 2 decoder layers.
    let dir = app.services.models.dir().join("tiny-folder");
    studio_train::tiny::write_tiny_model_folder(&dir, "llama", 5).unwrap();
    let body = |layers: serde_json::Value| {
        json!({"model": "tiny-folder", "training_file": file_id, "training_type": {"type": "full"},
            "method": {"type": "distillation", "distillation": {"teacher_model": "tiny-folder",
                "student_layers": layers}}})
    };

    let beyond = app.post_json("/v1/fine_tuning/jobs", body(json!([0, 2]))).await;
    let within = app.post_json("/v1/fine_tuning/jobs", body(json!([1]))).await;

    assert_eq!(beyond.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&beyond.body));
    assert_eq!(beyond.json()["error"]["param"], "method.distillation.student_layers");
    assert!(beyond.error_message().contains("layer 2"), "{}", beyond.error_message());
    assert!(beyond.error_message().contains("2 layers"), "{}", beyond.error_message());
    assert_eq!(within.status, StatusCode::OK, "{}", String::from_utf8_lossy(&within.body));
}

#[sqlx::test(migrations = "../../migrations")]
async fn distillation_estimate_counts_student_layers(pool: PgPool) {
    let app = test_app(pool);
    let file_id = app.uploaded_file_id().await;
    let dir = app.services.models.dir().join("tiny-folder");
    studio_train::tiny::write_tiny_model_folder(&dir, "llama", 5).unwrap();
    let supervised_body = json!({"model": "tiny-folder", "training_file": file_id, "training_type": {"type": "full"}});
    let mut distillation_body = supervised_body.clone();
    distillation_body["method"] = json!({"type": "distillation", "distillation": {"teacher_model": "tiny-folder",
        "student_layers": [1], "hyperparameters": {"kd_weight": 0.5}}});
    distillation_body["measure_steps"] = json!(1);

    let supervised = app.post_json("/v1/fine_tuning/estimate", supervised_body).await;
    let distilled = app.post_json("/v1/fine_tuning/estimate", distillation_body).await;
    let (supervised, distilled) = (supervised.json(), distilled.json());

    // The student drops layer 0 of the 2-layer model.
    let loaded = studio_train::loader::load_model(&dir, &candle_core::Device::Cpu).unwrap();
    let layer_0: u64 = loaded
        .weights
        .iter()
        .filter(|(name, _)| name.starts_with("model.layers.0."))
        .map(|(_, tensor)| tensor.elem_count() as u64)
        .sum();
    let supervised_total = supervised["total_parameters"].as_u64().unwrap();
    assert_eq!(distilled["method"], "distillation", "{distilled}");
    assert_eq!(supervised["method"], "supervised", "{supervised}");
    assert_eq!(distilled["total_parameters"].as_u64(), Some(supervised_total - layer_0));
    assert_eq!(distilled["trainable_parameters"], distilled["total_parameters"]);
    assert_eq!(distilled["tokens_per_epoch"], supervised["tokens_per_epoch"]);
    assert_eq!(distilled["examples"], 2);
    assert!(distilled["seconds_per_step"].as_f64().is_some_and(|s| s > 0.0), "{distilled}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn distillation_estimate_rejects_prompts_file(pool: PgPool) {
    let app = test_app(pool);
    studio_train::tiny::write_tiny_model_folder(&app.services.models.dir().join("tiny-folder"), "llama", 5).unwrap();
    let upload = app
        .upload("prompts.jsonl", "fine-tune", "{\"prompt\": \"Hi\"}\n{\"prompt\": \"Bye\"}\n")
        .await;
    let file_id = upload.json()["id"].as_str().unwrap().to_owned();

    let distilled = app
        .post_json(
            "/v1/fine_tuning/estimate",
            json!({"model": "tiny-folder", "training_file": file_id, "method": distillation("tiny-folder")}),
        )
        .await;
    let supervised = app
        .post_json("/v1/fine_tuning/estimate", json!({"model": "tiny-folder", "training_file": file_id}))
        .await;

    assert_eq!(distilled.status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&distilled.body));
    assert_eq!(distilled.json()["error"]["param"], "training_file");
    assert!(distilled.error_message().contains("teacher writes the replies"), "{}", distilled.error_message());
    assert!(!distilled.error_message().contains("max_seq_len"), "{}", distilled.error_message());
    assert_eq!(supervised.status, StatusCode::BAD_REQUEST);
    assert!(supervised.error_message().contains("prompts without replies"), "{}", supervised.error_message());
}
