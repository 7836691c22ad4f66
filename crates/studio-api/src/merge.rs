//! The merged model of a LoRA job, built on first download: the base model with the adapter's
//! `scale · B A` added to each adapted weight, as a Hugging Face folder.
//!
//! Building it on request keeps a job's storage at the adapter's few megabytes until a client
//! requests the merged model, which is as large as the base model in f32.

use std::path::Path;

use studio_store::keys::final_artifact_prefix;
use studio_store::{JobRecord, Services};
use studio_train::export::{save_model_folder, FolderMetadata, DEFAULT_MAX_SHARD_BYTES};
use studio_train::loader::load_model;
use studio_train::lora;
use studio_train::model::Llama;
use tokio::sync::Mutex;

use crate::error::ApiError;

/// Serialises merges in this process, so two downloads never build the same folder at once and
/// no download lists a folder that is still being uploaded.
// NOTE: several API processes sharing one artifact store can still build the same merged folder
// at once. The result is identical, but a reader in another process may list it half uploaded.
static MERGE_LOCK: Mutex<()> = Mutex::const_new(());

/// Builds and stores `jobs/{id}/final/merged/` unless it exists, holding the lock while it does.
pub async fn ensure_merged(services: &Services, job: &JobRecord) -> Result<(), ApiError> {
    let _guard = MERGE_LOCK.lock().await;
    let prefix = final_artifact_prefix(&job.id, "merged");
    if !services.artifacts.list(&prefix).await?.is_empty() {
        return Ok(());
    }
    let base = services.models.resolve(&job.spec.model).map_err(|err| {
        ApiError::not_found(
            format!("cannot build the merged model of fine-tuning job {}: {err}", job.id),
            Some("artifact"),
        )
    })?;

    let scratch = tempfile::tempdir().map_err(|err| ApiError::internal(format!("cannot create a scratch folder: {err}")))?;
    let adapter_dir = scratch.path().join("adapter");
    let merged_dir = scratch.path().join("merged");
    services
        .artifacts
        .get_dir(&final_artifact_prefix(&job.id, "adapter"), &adapter_dir)
        .await?;

    tracing::info!(job_id = %job.id, "building the merged model");
    let base_path = base.path.clone();
    let target = merged_dir.clone();
    tokio::task::spawn_blocking(move || merge(&base_path, &adapter_dir, &target))
        .await
        .map_err(|err| ApiError::internal(format!("the merge task failed: {err}")))?
        .map_err(|err| ApiError::internal(format!("merging the adapter into {} failed: {err}", base.name)))?;
    services.artifacts.put_dir(&prefix, &merged_dir).await?;
    Ok(())
}

fn merge(base: &Path, adapter: &Path, target: &Path) -> Result<(), studio_train::TrainError> {
    let device = candle_core::Device::Cpu;
    let loaded = load_model(base, &device)?;
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &device)?;
    lora::apply_adapter(&mut model, adapter)?;
    let metadata = FolderMetadata {
        tokenizer: &loaded.tokenizer,
        chat_template: loaded.chat_template.as_deref(),
        special: loaded.special,
    };
    save_model_folder(&model, &metadata, true, DEFAULT_MAX_SHARD_BYTES, target)
}
