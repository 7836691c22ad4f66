//! A real LoRA job whose dataset, checkpoints and adapter live in an S3 bucket of moto's server:
//! uploads and downloads go through the API, and nothing lands in the local artifact folder.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use reqwest::StatusCode;
use safetensors::SafeTensors;
use serde_json::{json, Value};
use studio_store::ARTIFACTS_DIR_NAME;

use crate::app::{expect_status, TestApp};
use crate::data::{self, MODEL};
use crate::moto::MotoServer;

const PREFIX: &str = "studio";
const N_CONVERSATIONS: usize = 8;
const BATCH_SIZE: u64 = 4;
const N_EPOCHS: u64 = 1;
const JOB_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// SmolLM2-135M has 30 layers; LoRA on q, k, v and o gives 4 modules × 2 matrices each.
const ADAPTER_TENSORS: usize = 30 * 4 * 2;

#[tokio::test]
async fn s3_bucket_holds_dataset_checkpoints_and_adapter() {
    let moto = MotoServer::start().await;
    let app = TestApp::spawn_with_worker_storing_in(moto.location(PREFIX)).await;
    let dataset = data::short_conversations(N_CONVERSATIONS);
    let file_id = app.upload_ok("short.jsonl", &dataset).await;

    let content = app.get_bytes(&format!("/v1/files/{file_id}/content")).await;
    assert!(
        content == dataset.as_bytes(),
        "the file content read back from the bucket differs"
    );

    let response = app.create_job(&job_request(&file_id)).await;
    let job = expect_status(response, StatusCode::OK, "POST /v1/fine_tuning/jobs").await;
    let job_id = job["id"].as_str().expect("the job has an id").to_owned();
    let job = app.wait_for_job(&job_id, JOB_TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "the job did not succeed: {job}");

    let archive = app
        .get_bytes(&format!(
            "/v1/fine_tuning/jobs/{job_id}/download?artifact=adapter"
        ))
        .await;
    let adapter = untar(&archive);
    assert_adapter(&adapter);

    let checkpoints = app
        .get_json(&format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"))
        .await;
    let checkpoint = &checkpoints["data"][0];
    let checkpoint_id = checkpoint["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no checkpoint: {checkpoints}"));
    let step = checkpoint["step_number"]
        .as_u64()
        .expect("a checkpoint has a step_number");
    let archive = app
        .get_bytes(&format!(
            "/v1/fine_tuning/jobs/{job_id}/download?artifact=adapter&checkpoint={checkpoint_id}"
        ))
        .await;
    assert_adapter(&untar(&archive));

    let objects: BTreeMap<String, u64> = moto.objects().await.into_iter().collect();
    let expected = [
        format!("{PREFIX}/files/{file_id}"),
        format!("{PREFIX}/jobs/{job_id}/final/adapter/adapter_config.json"),
        format!("{PREFIX}/jobs/{job_id}/final/adapter/adapter_model.safetensors"),
        format!("{PREFIX}/jobs/{job_id}/final/results.csv"),
        format!("{PREFIX}/jobs/{job_id}/checkpoints/step-{step}/adapter_model.safetensors"),
    ];
    for key in &expected {
        assert!(
            objects.contains_key(key),
            "{key} is not in the bucket: {:?}",
            objects.keys()
        );
    }
    assert_eq!(objects[&expected[0]], dataset.len() as u64);
    assert_eq!(
        objects[&expected[2]],
        adapter["adapter_model.safetensors"].len() as u64
    );
    let outside: Vec<&String> = objects
        .keys()
        .filter(|key| !key.starts_with(&format!("{PREFIX}/")))
        .collect();
    assert!(
        outside.is_empty(),
        "objects outside the prefix {PREFIX}/: {outside:?}"
    );
    assert_eq!(moto.pending_uploads().await, 0);

    let local_artifacts = app.data_dir().join(ARTIFACTS_DIR_NAME);
    assert!(
        !local_artifacts.exists(),
        "{} exists",
        local_artifacts.display()
    );
    app.stop().await;
}

fn job_request(file_id: &str) -> Value {
    json!({
        "model": MODEL,
        "training_file": file_id,
        "seed": 11,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": N_EPOCHS,
                    "batch_size": BATCH_SIZE,
                    "learning_rate": 1e-3,
                    "max_seq_len": 64,
                    "checkpoint_interval": 1,
                }
            }
        },
        "training_type": {"type": "lora", "r": 4, "alpha": 8},
    })
}

fn untar(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut reader = tar::Archive::new(archive);
    for entry in reader.entries().expect("the download is a tar archive") {
        let mut entry = entry.expect("a readable tar entry");
        let path = entry
            .path()
            .expect("a tar entry path")
            .to_string_lossy()
            .into_owned();
        let mut contents = Vec::new();
        entry
            .read_to_end(&mut contents)
            .expect("a readable tar entry");
        files.insert(path, contents);
    }
    files
}

fn assert_adapter(files: &BTreeMap<String, Vec<u8>>) {
    let names: Vec<&String> = files.keys().collect();
    assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
    let config: Value =
        serde_json::from_slice(&files["adapter_config.json"]).expect("adapter_config.json is JSON");
    assert_eq!(config["r"], 4, "{config}");
    let tensors = SafeTensors::deserialize(&files["adapter_model.safetensors"])
        .expect("adapter_model.safetensors is a valid safetensors file");
    assert_eq!(tensors.len(), ADAPTER_TENSORS);
}
