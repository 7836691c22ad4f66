//! `/v1/fine_tuning/jobs/{id}/metrics`: the loss curve, one point per optimizer step.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use studio_store::{MetricPoint, Services};

use crate::error::ApiError;
use crate::extract::IdPath;
use crate::jobs::find_job;

pub fn router() -> Router<Services> {
    Router::new().route("/v1/fine_tuning/jobs/{job_id}/metrics", get(list_metrics))
}

#[derive(Debug, Deserialize)]
struct MetricsQuery {
    /// Downsample to at most this many evenly spaced points; the last step is always kept.
    max_points: Option<usize>,
}

fn metric_object(point: &MetricPoint) -> Value {
    json!({
        "object": "fine_tuning.job.metric",
        "step": point.step,
        "epoch": point.epoch,
        "train_loss": point.train_loss,
        "train_mean_token_accuracy": point.train_mean_token_accuracy,
        "valid_loss": point.valid_loss,
        "valid_mean_token_accuracy": point.valid_mean_token_accuracy,
        "learning_rate": point.learning_rate,
        "grad_norm": point.grad_norm,
        "tokens_per_second": point.tokens_per_second,
        "trained_tokens": point.trained_tokens,
        "reward_chosen": point.rewards.map(|r| r.reward_chosen),
        "reward_rejected": point.rewards.map(|r| r.reward_rejected),
        "reward_accuracy": point.rewards.map(|r| r.reward_accuracy),
        "reward_margin": point.rewards.map(|r| r.reward_margin),
    })
}

async fn list_metrics(
    State(services): State<Services>,
    IdPath(job_id): IdPath,
    query: Result<Query<MetricsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let max_points = query?.0.max_points;
    if max_points == Some(0) {
        return Err(ApiError::invalid(
            "invalid 'max_points' 0: expected at least 2",
            Some("max_points"),
            "invalid_value",
        ));
    }
    let job = find_job(&services, &job_id).await?;
    let points = services.store.list_metrics(&job.id).await?;
    let points = match max_points {
        Some(max) => downsample(&points, max),
        None => points,
    };
    Ok(Json(json!({
        "object": "list",
        "data": points.iter().map(metric_object).collect::<Vec<_>>(),
        "has_more": false,
    })))
}

/// Picks `max` evenly spaced points, always the first and the last.
fn downsample(points: &[MetricPoint], max: usize) -> Vec<MetricPoint> {
    if points.len() <= max {
        return points.to_vec();
    }
    if max == 1 {
        return points.last().cloned().into_iter().collect();
    }
    let last = points.len() - 1;
    (0..max)
        .map(|i| points[i * last / (max - 1)].clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64) -> MetricPoint {
        MetricPoint {
            step,
            epoch: 0.0,
            train_loss: 1.0,
            train_mean_token_accuracy: None,
            valid_loss: None,
            valid_mean_token_accuracy: None,
            learning_rate: 1e-4,
            grad_norm: 1.0,
            tokens_per_second: 1.0,
            trained_tokens: step,
            rewards: None,
        }
    }

    #[test]
    fn downsample_keeps_first_and_last() {
        let points: Vec<_> = (1..=100).map(point).collect();
        let steps: Vec<u64> = downsample(&points, 5).iter().map(|p| p.step).collect();
        assert_eq!(steps, [1, 25, 50, 75, 100]);
    }

    #[test]
    fn downsample_leaves_short_curve_alone() {
        let points: Vec<_> = (1..=3).map(point).collect();
        assert_eq!(downsample(&points, 10), points);
    }
}
