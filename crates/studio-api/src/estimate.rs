//! `/v1/fine_tuning/estimate`: a dry run of a job create request. It reports what the job would
//! train, its tokens and steps, an estimate of its peak memory and, on request, a measured step
//! time, without queueing anything. DPO and distillation jobs are counted as their own runs
//! would process them.

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use studio_core::dataset::{parse_dataset, parse_preference_dataset, DatasetError};
use studio_core::JobSpec;
use studio_store::keys::file_key;
use studio_store::Services;
use studio_train::estimate::{Estimate, EstimateJob, EstimateMethod, TeacherModel};
use studio_train::{EventLevel, StepMetrics, StopRequest, TrainError, TrainObserver};
use studio_worker::plan::{approach, distill_settings, train_settings};

use crate::completions::{fetch_source, model_source};
use crate::error::ApiError;
use crate::extract::RawBody;
use crate::jobs::{check_file, check_file_format, check_teacher, parse_json_body, FileRole};

/// The maximum number of optimizer steps a request may time; each takes as long as a real step.
pub const MAX_MEASURE_STEPS: u64 = 5;
/// The seed of a request without one; it only affects the measured steps.
const DEFAULT_SEED: u64 = 0;

pub fn router() -> Router<Services> {
    Router::new().route("/v1/fine_tuning/estimate", post(estimate))
}

async fn estimate(
    State(services): State<Services>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let mut body = parse_json_body(&body)?;
    let measure_steps = take_measure_steps(&mut body)?;
    let spec = JobSpec::parse(&body, DEFAULT_SEED)?;

    let model = services.models.resolve(&spec.model)?;
    // Holds a fine-tuned teacher's downloaded artifacts until the estimate is done.
    let scratch = tempfile::tempdir()
        .map_err(|err| ApiError::internal(format!("cannot create a scratch folder: {err}")))?;
    let teacher = match spec.distillation() {
        Some(distillation) => Some(fetch_teacher(&services, &distillation.teacher_model, scratch.path()).await?),
        None => None,
    };
    let training = check_file(&services, &spec.training_file, "training_file").await?;
    check_file_format(&spec, &training, FileRole::Training)?;
    if let Some(validation_file) = &spec.validation_file {
        let validation = check_file(&services, validation_file, "validation_file").await?;
        check_file_format(&spec, &validation, FileRole::Validation)?;
    }
    let bytes = services
        .artifacts
        .read(&file_key(&spec.training_file))
        .await?;

    let estimate = tokio::task::spawn_blocking(move || {
        let mut observer = WarningCollector::default();
        let estimate = estimate_spec(&spec, &model.path, teacher.as_ref(), &bytes, measure_steps as usize, &mut observer)?;
        Ok::<_, ApiError>((estimate, observer.warnings))
    })
    .await
    .map_err(ApiError::internal)??;
    drop(scratch);

    let (estimate, warnings) = estimate;
    let mut object = serde_json::to_value(&estimate).map_err(ApiError::internal)?;
    object["object"] = "fine_tuning.estimate".into();
    object["warnings"] = warnings.into();
    Ok(Json(object))
}

/// A distillation teacher's model path and, for a teacher fine-tuned with LoRA, its adapter.
type TeacherFiles = (PathBuf, Option<PathBuf>);

/// Finds a distillation teacher as a job would and downloads a fine-tuned teacher's artifacts
/// into `scratch`.
async fn fetch_teacher(services: &Services, name: &str, scratch: &Path) -> Result<TeacherFiles, ApiError> {
    check_teacher(services, name).await?;
    let source = model_source(services, name).await?;
    fetch_source(services, source, scratch).await
}

/// Parses the training file as the job's method reads it and estimates the job.
fn estimate_spec(
    spec: &JobSpec,
    model_path: &Path,
    teacher: Option<&TeacherFiles>,
    bytes: &[u8],
    measure_steps: usize,
    observer: &mut dyn TrainObserver,
) -> Result<Estimate, ApiError> {
    let invalid_file = |err: DatasetError| {
        ApiError::invalid(
            format!("training file {}: {err}", spec.training_file),
            Some("training_file"),
            "invalid_training_file",
        )
    };
    let distill = distill_settings(spec);
    let (pairs, conversations);
    let method = match (spec.dpo_beta(), spec.distillation(), teacher, &distill) {
        (Some(beta), _, _, _) => {
            pairs = parse_preference_dataset(bytes).map_err(invalid_file)?;
            EstimateMethod::Dpo { pairs: &pairs, beta }
        }
        (None, Some(distillation), Some((path, adapter)), Some(distill)) => {
            conversations = parse_dataset(bytes).map_err(invalid_file)?.0;
            EstimateMethod::Distillation {
                conversations: &conversations,
                teacher: TeacherModel {
                    path,
                    adapter: adapter.as_deref(),
                    name: &distillation.teacher_model,
                },
                distill,
                student_name: &spec.model,
            }
        }
        _ => {
            conversations = parse_dataset(bytes).map_err(invalid_file)?.0;
            EstimateMethod::Supervised { conversations: &conversations }
        }
    };
    let job = EstimateJob {
        model_path,
        method,
        approach: &approach(spec),
        settings: &train_settings(spec),
        hold_out_validation: spec.validation_file.is_none(),
        measure_steps,
    };
    studio_train::estimate::estimate(&job, observer).map_err(train_error)
}

/// Removes the estimate's own `measure_steps` from the body, so the rest parses as a job.
fn take_measure_steps(body: &mut Value) -> Result<u64, ApiError> {
    let Some(object) = body.as_object_mut() else {
        return Ok(0);
    };
    match object.remove("measure_steps") {
        None | Some(Value::Null) => Ok(0),
        Some(value) => match value.as_u64() {
            Some(steps) if steps <= MAX_MEASURE_STEPS => Ok(steps),
            _ => Err(ApiError::invalid(
                format!("invalid 'measure_steps' {value}: expected an integer from 0 to {MAX_MEASURE_STEPS}"),
                Some("measure_steps"),
                "invalid_value",
            )),
        },
    }
}

fn train_error(err: TrainError) -> ApiError {
    match err {
        TrainError::InvalidData { message, param } => ApiError::InvalidRequest {
            message,
            param,
            code: Some("invalid_training_file"),
        },
        other => ApiError::internal(other),
    }
}

/// Keeps the trainer's warnings (examples dropped as too long, for example) for the response.
#[derive(Default)]
struct WarningCollector {
    warnings: Vec<String>,
}

impl TrainObserver for WarningCollector {
    fn on_step(&mut self, _metrics: &StepMetrics) {}

    fn on_event(&mut self, level: EventLevel, message: &str) {
        if level != EventLevel::Info {
            self.warnings.push(message.to_owned());
        }
    }

    fn stop_request(&mut self) -> Option<StopRequest> {
        None
    }
}
