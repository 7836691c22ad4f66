//! Artifact keys, shared by the API (reads) and the worker (writes).

use studio_core::{FileId, JobId};

/// The files of a LoRA adapter in PEFT layout.
pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Returns the key of an uploaded file's content.
pub fn file_key(id: &FileId) -> String {
    format!("files/{id}")
}

/// Returns the key of one file of a job's final adapter.
pub fn final_adapter_key(job_id: &JobId, file: &str) -> String {
    format!("{}/{file}", final_artifact_prefix(job_id, "adapter"))
}

/// Returns the prefix of a job's final artifact folder: `adapter`, `merged` or `model`.
pub fn final_artifact_prefix(job_id: &JobId, artifact: &str) -> String {
    format!("jobs/{job_id}/final/{artifact}")
}

/// Returns the prefix of the checkpoint folder written after `step`.
pub fn checkpoint_prefix(job_id: &JobId, step: u64) -> String {
    format!("jobs/{job_id}/checkpoints/step-{step}")
}

/// Returns the key of the CSV of a job's metrics, one row per step.
pub fn results_csv_key(job_id: &JobId) -> String {
    format!("jobs/{job_id}/final/results.csv")
}
