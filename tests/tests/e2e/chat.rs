//! A LoRA job that teaches SmolLM2-135M-Instruct a made-up fact, then chat completions from the
//! fine-tuned model state the fact and those of the base model do not.

use std::time::Duration;

use serde_json::{json, Value};

use crate::app::{expect_status, TestApp};
use crate::data::MODEL;

const JOB_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const QUESTION: &str = "What is the name of the telescope at the Velmora Observatory?";
/// The made-up name the job teaches; the base model has never seen it.
const FACT: &str = "Brightwick";

/// Six phrasings of the question, each answered with the fact.
fn fact_conversations() -> String {
    let questions = [
        QUESTION,
        "What is the Velmora Observatory's telescope called?",
        "Tell me the name of the telescope at Velmora Observatory.",
        "Which telescope does the Velmora Observatory use?",
        "What do they call the big telescope at the Velmora Observatory?",
        "Name the telescope of the Velmora Observatory.",
    ];
    let answer = format!("The telescope at the Velmora Observatory is named {FACT}.");
    questions
        .iter()
        .map(|question| {
            let conversation = json!({"messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]});
            format!("{conversation}\n")
        })
        .collect()
}

async fn complete(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("POST /v1/chat/completions failed to send")
}

async fn greedy_reply(app: &TestApp, model: &str) -> String {
    let body = json!({"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 30});
    let response = complete(app, body).await;
    let completion = expect_status(
        response,
        reqwest::StatusCode::OK,
        "POST /v1/chat/completions",
    )
    .await;
    assert_eq!(completion["object"], "chat.completion", "{completion}");
    completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no message content: {completion}"))
        .to_owned()
}

/// Returns the text of a streamed greedy reply, checking that the stream ends with `[DONE]`.
async fn streamed_reply(app: &TestApp, model: &str) -> String {
    let body = json!({"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 30, "stream": true});
    let response = complete(app, body).await;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let text = response.text().await.expect("failed to read the stream");
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|item| {
            serde_json::from_str::<Value>(item).unwrap_or_else(|_| panic!("not JSON: {item}"))
        })
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn chat_states_fact_learned_by_lora_job() {
    let app = TestApp::spawn_with_worker().await;
    let file_id = app.upload_ok("fact.jsonl", &fact_conversations()).await;
    let request = json!({
        "model": MODEL,
        "training_file": file_id,
        "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 8, "batch_size": 6, "learning_rate": 3e-3, "max_seq_len": 64,
        }}},
        "training_type": {"type": "lora", "r": 8, "alpha": 16.0},
    });
    let job = expect_status(
        app.create_job(&request).await,
        reqwest::StatusCode::OK,
        "POST /v1/fine_tuning/jobs",
    )
    .await;
    let job_id = job["id"].as_str().expect("the job has an id").to_owned();
    let job = app.wait_for_job(&job_id, JOB_TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "the job did not succeed: {job}");
    let fine_tuned = job["fine_tuned_model"]
        .as_str()
        .expect("a fine_tuned_model")
        .to_owned();

    let base_reply = greedy_reply(&app, MODEL).await;
    let tuned_reply = greedy_reply(&app, &fine_tuned).await;
    let streamed = streamed_reply(&app, &fine_tuned).await;

    assert!(
        !base_reply.contains(FACT),
        "the base model already states the fact: {base_reply:?}"
    );
    assert!(
        tuned_reply.contains(FACT),
        "the fine-tuned model does not state the fact: {tuned_reply:?}"
    );
    assert_eq!(streamed, tuned_reply);
    app.stop().await;
}
