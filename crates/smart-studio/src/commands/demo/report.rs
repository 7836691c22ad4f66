//! The demo's closing output: the loss curve, where the adapter is, and how to query the job.

use std::collections::BTreeMap;
use std::path::Path;

use reqwest::Url;

use super::client::{Job, Metric};

const BAR_WIDTH: f64 = 40.0;

/// Prints one line per step with a bar proportional to `train_loss`, then the mean loss of each
/// epoch and its change from the first epoch to the last.
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

    println!(
        "First step loss {:.4}, last step loss {:.4}.",
        first.train_loss, last.train_loss
    );

    // Each epoch trains on every example once, so epoch means compare like with like, while single
    // batches differ in their examples.
    let epochs = epoch_means(metrics);
    let means: Vec<String> = epochs
        .iter()
        .map(|(epoch, mean)| format!("epoch {epoch}: {mean:.4}"))
        .collect();
    println!("Mean loss by epoch: {}", means.join(", "));
    if let [(_, first_mean), .., (_, last_mean)] = epochs.as_slice() {
        let change = (last_mean - first_mean) / first_mean * 100.0;
        println!("The mean loss changed by {change:+.1}% from the first epoch to the last.");
    }
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

/// Averages `train_loss` over the steps of each epoch. A step belongs to the epoch it ends in,
/// so the step that ends at epoch 1.0 is the last step of epoch 1.
fn epoch_means(metrics: &[Metric]) -> Vec<(u32, f64)> {
    let mut sums: BTreeMap<u32, (f64, u32)> = BTreeMap::new();
    for metric in metrics {
        let epoch = (metric.epoch - 1e-9).ceil().max(1.0) as u32;
        let entry = sums.entry(epoch).or_insert((0.0, 0));
        entry.0 += metric.train_loss;
        entry.1 += 1;
    }
    sums.into_iter()
        .map(|(epoch, (sum, count))| (epoch, sum / f64::from(count)))
        .collect()
}

fn mean_tokens_per_second(metrics: &[Metric]) -> Option<f64> {
    let values: Vec<f64> = metrics.iter().filter_map(|metric| metric.tokens_per_second).collect();
    if values.is_empty() {
        return None;
    }
    Some(values.iter().sum::<f64>() / values.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(step: u64, epoch: f64, train_loss: f64) -> Metric {
        Metric {
            step,
            epoch,
            train_loss,
            learning_rate: None,
            tokens_per_second: None,
        }
    }

    #[test]
    fn epoch_means_group_steps_by_epoch() {
        let metrics = [
            metric(1, 0.5, 3.0),
            metric(2, 1.0, 2.0),
            metric(3, 1.5, 1.5),
            metric(4, 2.0, 0.5),
        ];

        assert_eq!(epoch_means(&metrics), vec![(1, 2.5), (2, 1.0)]);
    }
}
