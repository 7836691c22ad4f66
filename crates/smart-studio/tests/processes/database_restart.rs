//! The database stops and starts again under a running job: the API returns 503 with
//! `Retry-After` meanwhile, and the job succeeds with every metric, event and checkpoint of
//! the run stored.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::api::{self, Api};
use crate::children::{Stack, WorkerTiming};
use crate::data::{self, MODEL};
use crate::postgres_server::PostgresServer;

const N_CONVERSATIONS: u64 = 16;
const BATCH_SIZE: u64 = 2;
const N_EPOCHS: u64 = 2;
const TOTAL_STEPS: u64 = N_CONVERSATIONS.div_ceil(BATCH_SIZE) * N_EPOCHS;
const CHECKPOINT_INTERVAL: u64 = 4;
const R: u64 = 8;
const TIMING: WorkerTiming = WorkerTiming {
    lease: 30.0,
    heartbeat_interval: 1.0,
    poll_interval: 0.5,
};
/// Steps trained before the database stops, so that the outage falls mid-run.
const STEPS_BEFORE_OUTAGE: u64 = 3;
/// How long the database stays down after the API first returned 503.
const OUTAGE_AFTER_UNAVAILABLE: Duration = Duration::from_secs(3);
const STEPS_TIMEOUT: Duration = Duration::from_secs(240);
const UNAVAILABLE_TIMEOUT: Duration = Duration::from_secs(20);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[tokio::test]
async fn job_survives_database_restart() {
    let _serial = crate::one_at_a_time().await;
    let mut server = PostgresServer::start();
    let stack = Stack::start(&server.url()).await;
    let api = &stack.api;
    let worker = stack.start_worker("worker", &TIMING);

    let jsonl = data::short_conversations(N_CONVERSATIONS as usize);
    let file_id = api.upload("restart.jsonl", &jsonl).await;
    let job_id = api.create_job(&job_request(&file_id)).await;

    wait_for_steps(api, &job_id, STEPS_BEFORE_OUTAGE).await;
    server.stop();
    let stopped_at = Instant::now();
    wait_for_unavailable(api, &job_id).await;
    tokio::time::sleep(OUTAGE_AFTER_UNAVAILABLE).await;
    server.start_again();
    let outage = stopped_at.elapsed();
    assert!(
        outage.as_secs_f64() < TIMING.lease,
        "the database was down for {outage:?}, longer than the {} s lease",
        TIMING.lease
    );

    let job = api.wait_until_finished(&job_id, JOB_TIMEOUT).await;
    let report = api.report(&job_id).await;
    assert_eq!(
        job["status"], "succeeded",
        "the job did not succeed: {job}\n{report}"
    );
    assert!(
        job["trained_tokens"].as_u64().unwrap_or(0) > 0,
        "no trained_tokens: {job}"
    );

    let metrics = api.metrics(&job_id).await;
    api::assert_complete_loss_curve(&metrics, TOTAL_STEPS);

    let events = api.events(&job_id).await;
    assert_no_event_lost(&events, &report);

    let checkpoints: Vec<u64> = api
        .checkpoints(&job_id)
        .await
        .iter()
        .map(|checkpoint| {
            checkpoint["step_number"]
                .as_u64()
                .expect("a checkpoint has a step")
        })
        .collect();
    let expected: Vec<u64> = (1..=TOTAL_STEPS / CHECKPOINT_INTERVAL)
        .rev()
        .map(|k| k * CHECKPOINT_INTERVAL)
        .collect();
    assert_eq!(
        checkpoints, expected,
        "checkpoint steps, latest first\n{report}"
    );

    api::assert_adapter_downloads(api, &job_id, R).await;

    drop(worker);
    drop(stack);
    server.stop();
}

fn job_request(file_id: &str) -> Value {
    json!({
        "model": MODEL,
        "training_file": file_id,
        "suffix": "restart",
        "seed": 13,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": N_EPOCHS,
                    "batch_size": BATCH_SIZE,
                    "learning_rate": 1e-3,
                    "max_seq_len": 128,
                    "checkpoint_interval": CHECKPOINT_INTERVAL,
                }
            }
        },
        "training_type": {"type": "lora", "r": R, "alpha": 16},
    })
}

/// Polls the metrics until `steps` steps are recorded, and panics when the run reaches its
/// last step first or the deadline passes.
async fn wait_for_steps(api: &Api, job_id: &str, steps: u64) {
    let deadline = Instant::now() + STEPS_TIMEOUT;
    loop {
        let last_step = api::losses(&api.metrics(job_id).await)
            .last()
            .map(|(step, _)| *step)
            .unwrap_or(0);
        if last_step >= steps {
            assert!(
                last_step < TOTAL_STEPS,
                "the job reached its last step {last_step} before the outage; give it more steps"
            );
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "fewer than {steps} steps within {STEPS_TIMEOUT:?}\n{}",
                api.report(job_id).await
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `GET /v1/fine_tuning/jobs/{id}` until it returns 503 with a `Retry-After` header of
/// whole seconds and OpenAI's error envelope.
async fn wait_for_unavailable(api: &Api, job_id: &str) {
    let path = format!("/v1/fine_tuning/jobs/{job_id}");
    let deadline = Instant::now() + UNAVAILABLE_TIMEOUT;
    loop {
        let last = match api.get(&path).await {
            Ok(response) => {
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .map(|value| value.to_str().unwrap_or("(not text)").to_owned());
                let body = response.text().await.unwrap_or_default();
                if status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_some() {
                    let retry_after = retry_after.unwrap_or_default();
                    assert!(
                        retry_after.parse::<u64>().is_ok_and(|seconds| seconds > 0),
                        "Retry-After {retry_after:?} is not a positive number of seconds"
                    );
                    let error: Value = serde_json::from_str(&body).unwrap_or_else(|error| {
                        panic!("the 503 body is not JSON ({error}): {body}")
                    });
                    assert_eq!(error["error"]["type"], "server_error", "{error}");
                    assert!(error["error"]["message"].is_string(), "{error}");
                    return;
                }
                format!("HTTP {status}, Retry-After {retry_after:?}: {body}")
            }
            Err(error) => format!("request failed: {error}"),
        };
        assert!(
            Instant::now() < deadline,
            "GET {path} did not return 503 with Retry-After within {UNAVAILABLE_TIMEOUT:?} of \
             the database stopping; last response: {last}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts that the events of the whole run are stored, those written around the outage too:
/// one attempt, a "Step k/N" progress event for every step, and the success last.
fn assert_no_event_lost(events: &[Value], report: &str) {
    let messages = api::messages(events);
    let count = |prefix: &str| {
        messages
            .iter()
            .filter(|message| message.starts_with(prefix))
            .count()
    };

    assert_eq!(
        count("Fine-tuning job started (attempt 1 of "),
        1,
        "one start event of attempt 1 expected\n{report}"
    );
    assert_eq!(
        count("Fine-tuning job started (attempt 2 of "),
        0,
        "the job was claimed again, so the outage cost it its lease\n{report}"
    );
    // Runs of fewer than 40 steps get a progress event at every step.
    let missing: Vec<u64> = (1..=TOTAL_STEPS)
        .filter(|step| count(&format!("Step {step}/{TOTAL_STEPS}:")) == 0)
        .collect();
    assert!(
        missing.is_empty(),
        "no progress event for steps {missing:?}\n{report}"
    );
    assert!(
        messages
            .last()
            .is_some_and(|message| message.starts_with("The job has successfully completed")),
        "the last event is not the success event\n{report}"
    );
}
