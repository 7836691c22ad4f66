//! A worker killed with SIGKILL mid-run: its lease expires, a second worker takes the job
//! over, resumes from the latest checkpoint, and the job succeeds with a whole loss curve.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::{self, Api};
use crate::children::{Stack, WorkerTiming};
use crate::data::{self, MODEL};
use crate::database::TestDatabase;

const N_CONVERSATIONS: u64 = 12;
const BATCH_SIZE: u64 = 2;
const N_EPOCHS: u64 = 2;
const TOTAL_STEPS: u64 = N_CONVERSATIONS.div_ceil(BATCH_SIZE) * N_EPOCHS;
const CHECKPOINT_INTERVAL: u64 = 3;
const R: u64 = 8;
/// A short lease, so that the job goes back to the queue soon after its worker dies.
const TIMING: WorkerTiming = WorkerTiming {
    lease: 4.0,
    heartbeat_interval: 1.0,
    poll_interval: 0.2,
};
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(240);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The resumed run restores the adapter, the optimizer, the random generator and the data
/// position, so it repeats the killed worker's steps. The tolerance only allows for a
/// different summation order in parallel kernels.
const LOSS_TOLERANCE: f64 = 1e-3;

const RESCUE_EVENT: &str = "The worker stopped sending heartbeats; the job goes back to the queue";

#[tokio::test]
async fn killed_worker_job_resumes_on_another() {
    let _serial = crate::one_at_a_time().await;
    let database = TestDatabase::create();
    let stack = Stack::start(&database.url).await;
    let api = &stack.api;
    let mut worker_a = stack.start_worker("worker-a", &TIMING);

    let jsonl = data::short_conversations(N_CONVERSATIONS as usize);
    let file_id = api.upload("crash.jsonl", &jsonl).await;
    let job_id = api.create_job(&job_request(&file_id)).await;

    let checkpoint_step = wait_for_step_past_checkpoint(api, &job_id).await;
    worker_a.kill();

    // Nothing rescues the job before another worker runs, so it is still A's.
    let job = api.job(&job_id).await;
    assert_eq!(
        job["status"], "running",
        "the job left running before worker A was killed; give it more steps: {job}"
    );
    let metrics_a = api.metrics(&job_id).await;
    let checkpoints_a = api.checkpoints(&job_id).await;
    let latest_a = checkpoints_a
        .first()
        .and_then(|c| c["step_number"].as_u64());
    assert_eq!(
        latest_a,
        Some(checkpoint_step),
        "worker A registered another checkpoint between the poll and the kill: {checkpoints_a:?}"
    );

    let worker_b = stack.start_worker("worker-b", &TIMING);
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
    assert!(
        job["fine_tuned_model"].is_string(),
        "no fine_tuned_model: {job}"
    );
    assert!(
        job["error"].is_null(),
        "a succeeded job has an error: {job}"
    );

    let metrics = api.metrics(&job_id).await;
    api::assert_complete_loss_curve(&metrics, TOTAL_STEPS);
    assert_resumed_steps_repeat_losses(&metrics_a, &metrics, checkpoint_step);

    let events = api.events(&job_id).await;
    assert_rescue_and_resume_events(&events, checkpoint_step, &report);

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
    assert_eq!(checkpoints, expected, "checkpoint steps, latest first");

    api::assert_adapter_downloads(api, &job_id, R).await;

    let log_b = worker_b.log();
    assert!(
        log_b.contains("rescued a job whose lease expired") && log_b.contains(&job_id),
        "worker B's log does not show that it rescued job {job_id}"
    );
    assert!(
        log_b.contains("fine-tuning job succeeded"),
        "worker B's log does not show that it finished the job"
    );
    assert!(
        !worker_a.log().contains("fine-tuning job succeeded"),
        "worker A's log shows a finished job, but it was killed mid-run"
    );
}

fn job_request(file_id: &str) -> Value {
    json!({
        "model": MODEL,
        "training_file": file_id,
        "suffix": "crash",
        "seed": 11,
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

/// Polls until a checkpoint is listed and the metrics have a step after it, and returns the
/// checkpoint's step.
async fn wait_for_step_past_checkpoint(api: &Api, job_id: &str) -> u64 {
    let deadline = Instant::now() + CHECKPOINT_TIMEOUT;
    loop {
        let latest = api
            .checkpoints(job_id)
            .await
            .first()
            .and_then(|checkpoint| checkpoint["step_number"].as_u64());
        if let Some(checkpoint_step) = latest {
            let last_step = api::losses(&api.metrics(job_id).await)
                .last()
                .map(|(step, _)| *step)
                .unwrap_or(0);
            if last_step > checkpoint_step {
                assert!(
                    last_step < TOTAL_STEPS,
                    "the job reached its last step {last_step} before the kill; give it more steps"
                );
                return checkpoint_step;
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "no step past a checkpoint within {CHECKPOINT_TIMEOUT:?}\n{}",
                api.report(job_id).await
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Asserts that the steps after the checkpoint, trained again by worker B, have the losses
/// worker A recorded for them: the resume restored the whole training state.
fn assert_resumed_steps_repeat_losses(
    metrics_a: &[Value],
    metrics: &[Value],
    checkpoint_step: u64,
) {
    let final_losses: std::collections::BTreeMap<u64, f64> =
        api::losses(metrics).into_iter().collect();
    let repeated: Vec<(u64, f64)> = api::losses(metrics_a)
        .into_iter()
        .filter(|(step, _)| *step > checkpoint_step)
        .collect();
    assert!(
        !repeated.is_empty(),
        "worker A recorded no step after checkpoint {checkpoint_step}"
    );
    for (step, loss_a) in repeated {
        let loss = final_losses[&step];
        assert!(
            (loss - loss_a).abs() <= LOSS_TOLERANCE * loss_a.abs(),
            "step {step}: loss {loss} after the resume, {loss_a} before the kill"
        );
    }
}

/// Asserts that the events show, in order: the first attempt, the rescue, the second attempt
/// and its resume from `checkpoint_step`, and the success.
fn assert_rescue_and_resume_events(events: &[Value], checkpoint_step: u64, report: &str) {
    let messages = api::messages(events);
    let position = |needle: &str| {
        messages
            .iter()
            .position(|message| message.starts_with(needle))
            .unwrap_or_else(|| panic!("no event starts with {needle:?}\n{report}"))
    };

    // The job object has no attempt count, so the start events are where the API shows it.
    let first_attempt = position("Fine-tuning job started (attempt 1 of ");
    let rescue = position(RESCUE_EVENT);
    let second_attempt = position("Fine-tuning job started (attempt 2 of ");
    let resume = position(&format!("Resuming from step {checkpoint_step}"));
    let success = position("The job has successfully completed");
    assert!(
        first_attempt < rescue
            && rescue < second_attempt
            && second_attempt < resume
            && resume < success,
        "events out of order: attempt 1 at {first_attempt}, rescue at {rescue}, attempt 2 at \
         {second_attempt}, resume at {resume}, success at {success}\n{report}"
    );
    assert_eq!(
        events[rescue]["level"], "warn",
        "the rescue event: {}",
        events[rescue]
    );
    assert!(
        !messages
            .iter()
            .any(|message| message.starts_with("Fine-tuning job started (attempt 3 of ")),
        "the job was claimed a third time\n{report}"
    );
}
