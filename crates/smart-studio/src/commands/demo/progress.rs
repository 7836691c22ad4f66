//! Follows a running job: a progress bar with step, loss and throughput, and the job's events
//! printed above it.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::client::{Job, Metric, StudioClient};

const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Polls the job until it reaches a terminal status, and returns it when it succeeded. When
/// `interrupt` is cancelled first (Ctrl-C), the job is cancelled; when `stopped` is, the API or
/// the worker has exited and the job cannot finish.
pub async fn watch_job(
    client: &StudioClient,
    job_id: &str,
    estimated_steps: u64,
    interrupt: &CancellationToken,
    stopped: &CancellationToken,
) -> anyhow::Result<Job> {
    let bar = ProgressBar::new(estimated_steps).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg}")
            .expect("the progress template is valid"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("waiting for the worker...");
    let mut seen_events = HashSet::new();
    let mut last_step = 0;

    loop {
        tokio::select! {
            _ = interrupt.cancelled() => {
                bar.abandon_with_message("interrupted");
                cancel_quietly(client, job_id).await;
                bail!("the demo was interrupted before job {job_id} finished; the job was cancelled");
            }
            _ = stopped.cancelled() => {
                bar.abandon_with_message("stopped");
                bail!("the REST API or the worker stopped before job {job_id} finished");
            }
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }

        let job = client.job(job_id).await?;
        for event in client.events(job_id).await? {
            if seen_events.insert(event.id.clone()) {
                let level = event.level.as_deref().unwrap_or("info");
                bar.println(format!("  [{level}] {}", event.message));
            }
        }
        let metrics = client.metrics(job_id).await?;
        if let Some(latest) = metrics.last() {
            if latest.step != last_step {
                last_step = latest.step;
                show_step(&bar, latest);
            }
        }

        match job.status.as_str() {
            "succeeded" => {
                bar.finish_with_message("done");
                return Ok(job);
            }
            "failed" => {
                bar.abandon_with_message("failed");
                bail!("job {job_id} failed: {}", describe_error(&job));
            }
            "cancelled" => {
                bar.abandon_with_message("cancelled");
                bail!("job {job_id} was cancelled");
            }
            _ => {}
        }
    }
}

fn show_step(bar: &ProgressBar, metric: &Metric) {
    if metric.step > bar.length().unwrap_or(0) {
        bar.set_length(metric.step);
    }
    bar.set_position(metric.step);

    let tokens_per_second = metric
        .tokens_per_second
        .map(|value| format!("{value:.0} tokens/s"))
        .unwrap_or_default();
    let message = format!("loss {:.4}  {tokens_per_second}", metric.train_loss);
    // A hidden bar (standard error is not a terminal) still leaves one line per step in logs.
    if bar.is_hidden() {
        eprintln!("step {}: {message}", metric.step);
    }
    bar.set_message(message);
}

fn describe_error(job: &Job) -> String {
    let Some(error) = &job.error else {
        return "the job reports no error message".to_owned();
    };
    let message = error.message.as_deref().unwrap_or("no message");
    match (&error.code, &error.param) {
        (Some(code), Some(param)) => format!("{message} (code {code}, param {param})"),
        (Some(code), None) => format!("{message} (code {code})"),
        _ => message.to_owned(),
    }
}

async fn cancel_quietly(client: &StudioClient, job_id: &str) {
    if let Err(error) = client.cancel_job(job_id).await {
        tracing::warn!(job_id, error = %format!("{error:#}"), "failed to cancel the demo job");
    }
}
