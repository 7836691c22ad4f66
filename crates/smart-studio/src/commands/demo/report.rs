//! The demo's closing output: the loss curve, where the adapter is, and how to query the job.

use std::path::Path;

use reqwest::Url;

use super::client::{Job, Metric};

const BAR_WIDTH: f64 = 40.0;

/// Prints one line per step with a bar proportional to `train_loss`, then the change from the
/// first to the last step.
pub fn print_loss_curve(metrics: &[Metric]) {
    let (Some(first), Some(last)) = (metrics.first(), metrics.last()) else {
        println!("The job recorded no metrics.");
        return;
    };
    let max_loss = metrics
        .iter()
        .map(|metric| metric.train_loss)
        .fold(f64::MIN, f64::max)
        .max(f64::EPSILON);

    println!("\nTraining loss by step:");
    for metric in metrics {
        let width = (metric.train_loss / max_loss * BAR_WIDTH).round().max(0.0) as usize;
        let learning_rate = metric
            .learning_rate
            .map(|value| format!("lr {value:.2e}"))
            .unwrap_or_default();
        println!(
            "  step {:>3}  epoch {:>5.2}  {learning_rate:<11} loss {:>7.4}  {}",
            metric.step,
            metric.epoch,
            metric.train_loss,
            "#".repeat(width)
        );
    }

    let change = (last.train_loss - first.train_loss) / first.train_loss * 100.0;
    println!(
        "Loss went from {:.4} at step {} to {:.4} at step {} ({change:+.1}%).",
        first.train_loss, first.step, last.train_loss, last.step
    );
    if let Some(mean) = mean_tokens_per_second(metrics) {
        println!("Mean training throughput: {mean:.1} tokens/s.");
    }
}

/// Prints where the adapter is and how to look at the job again over the REST API.
pub fn print_summary(job: &Job, adapter_dir: &Path, base_url: &Url) {
    let base = base_url.as_str().trim_end_matches('/');
    let job_url = format!("{base}/v1/fine_tuning/jobs/{}", job.id);

    println!("\nJob {} succeeded.", job.id);
    if let Some(model) = &job.fine_tuned_model {
        println!("Fine-tuned model: {model}");
    }
    if let Some(tokens) = job.trained_tokens {
        println!("Trained tokens: {tokens}");
    }
    println!("LoRA adapter (PEFT format): {}", adapter_dir.display());
    println!("\nThe demo has stopped its server. Start it again with `smart-studio serve` (same");
    println!("DATABASE_URL and data folder) to look at the job:");
    println!("  curl {job_url}");
    println!("  curl {job_url}/events");
    println!("  curl {job_url}/metrics");
    println!("  curl -o adapter.tar '{job_url}/download?artifact=adapter'");
}

fn mean_tokens_per_second(metrics: &[Metric]) -> Option<f64> {
    let values: Vec<f64> = metrics.iter().filter_map(|metric| metric.tokens_per_second).collect();
    if values.is_empty() {
        return None;
    }
    Some(values.iter().sum::<f64>() / values.len() as f64)
}
