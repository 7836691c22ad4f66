use std::path::PathBuf;

/// Errors of the trainer. [`TrainError::code`] and [`TrainError::param`] feed the job's
/// `error {code, message, param}`.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{message}")]
    InvalidData {
        message: String,
        param: Option<String>,
    },
    #[error("failed to load model {path}: {message}")]
    ModelLoad { path: PathBuf, message: String },
    #[error("training diverged: {0}")]
    NonFinite(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl TrainError {
    /// Returns a stable machine-readable code, in the style of OpenAI's job errors.
    pub fn code(&self) -> &'static str {
        match self {
            TrainError::InvalidData { .. } => "invalid_training_file",
            TrainError::ModelLoad { .. } => "model_load_failed",
            TrainError::NonFinite(_) => "training_diverged",
            TrainError::Candle(_) | TrainError::Io(_) => "internal_error",
        }
    }

    /// Returns the request field the error is about, when there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            TrainError::InvalidData { param, .. } => param.as_deref(),
            TrainError::ModelLoad { .. } => Some("model"),
            _ => None,
        }
    }
}
