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
    format!("jobs/{job_id}/final/adapter/{file}")
}
