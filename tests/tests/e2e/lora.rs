//! A real LoRA job on SmolLM2-135M-Instruct: it trains, the loss falls, and the adapter is a
//! PEFT adapter with every expected tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::time::Duration;

use safetensors::SafeTensors;
use serde_json::{json, Value};

use crate::app::{expect_status, TestApp};
use crate::data::{self, MODEL};

const N_CONVERSATIONS: usize = 24;
const N_EPOCHS: u64 = 4;
const BATCH_SIZE: u64 = 4;
const R: usize = 8;
const ALPHA: f64 = 16.0;
const JOB_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// SmolLM2-135M: 30 layers, hidden size 576, 9 query heads and 3 key/value heads of size 64.
const N_LAYERS: usize = 30;
const HIDDEN: usize = 576;
const KV_DIM: usize = 192;
const TARGET_MODULES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

#[tokio::test]
async fn lora_job_trains_and_exports_peft_adapter() {
    let app = TestApp::spawn_with_worker().await;
    let file_id = app
        .upload_ok("selfinstruct_short.jsonl", &data::short_conversations(N_CONVERSATIONS))
        .await;

    let response = app.create_job(&job_request(&file_id)).await;
    let job = expect_status(response, reqwest::StatusCode::OK, "POST /v1/fine_tuning/jobs").await;
    let job_id = job["id"].as_str().expect("the job has an id").to_owned();
    let job = app.wait_for_job(&job_id, JOB_TIMEOUT).await;

    assert_eq!(job["status"], "succeeded", "the job did not succeed: {job}");
    assert!(job["trained_tokens"].as_u64().unwrap_or(0) > 0, "no trained_tokens: {job}");
    assert!(job["fine_tuned_model"].is_string(), "no fine_tuned_model: {job}");

    let metrics = app.get_json(&format!("/v1/fine_tuning/jobs/{job_id}/metrics")).await;
    assert_loss_falls(&metrics);

    let archive = app
        .get_bytes(&format!("/v1/fine_tuning/jobs/{job_id}/download?artifact=adapter"))
        .await;
    let files = untar(&archive);
    assert_adapter_config(&files);
    assert_adapter_tensors(&files);
    app.stop().await;
}

fn job_request(file_id: &str) -> Value {
    json!({
        "model": MODEL,
        "training_file": file_id,
        "suffix": "e2e",
        "seed": 7,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": N_EPOCHS,
                    "batch_size": BATCH_SIZE,
                    "learning_rate": 1e-3,
                    "max_seq_len": 128,
                }
            }
        },
        "training_type": {"type": "lora", "r": R, "alpha": ALPHA},
    })
}

/// Asserts that the mean `train_loss` of the last quarter of the steps is at least 20% below that
/// of the first quarter.
fn assert_loss_falls(metrics: &Value) {
    let mut points: Vec<(u64, f64)> = metrics["data"]
        .as_array()
        .expect("metrics are a list")
        .iter()
        .map(|point| {
            let step = point["step"].as_u64().expect("a metric has a step");
            let loss = point["train_loss"].as_f64().expect("a metric has a train_loss");
            (step, loss)
        })
        .collect();
    points.sort_by_key(|(step, _)| *step);

    // The trainer may hold out a few examples for validation, so the step count is a range.
    let max_steps = (N_CONVERSATIONS as u64).div_ceil(BATCH_SIZE) * N_EPOCHS;
    let steps: Vec<u64> = points.iter().map(|(step, _)| *step).collect();
    let expected: Vec<u64> = (1..=steps.len() as u64).collect();
    assert_eq!(steps, expected, "one metric per step expected: {metrics}");
    assert!(
        (2 * N_EPOCHS..=max_steps).contains(&(steps.len() as u64)),
        "{} steps, expected between {} and {max_steps}: {metrics}",
        steps.len(),
        2 * N_EPOCHS
    );
    assert!(points.iter().all(|(_, loss)| loss.is_finite()), "a loss is not finite: {metrics}");

    let window = points.len() / 4;
    let mean = |slice: &[(u64, f64)]| slice.iter().map(|(_, loss)| loss).sum::<f64>() / slice.len() as f64;
    let first = mean(&points[..window]);
    let last = mean(&points[points.len() - window..]);
    assert!(
        last <= 0.8 * first,
        "the loss fell too little: mean of the first {window} steps {first:.4}, of the last {window} {last:.4}"
    );
}

fn untar(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut reader = tar::Archive::new(archive);
    for entry in reader.entries().expect("the download is a tar archive") {
        let mut entry = entry.expect("a readable tar entry");
        let path = entry.path().expect("a tar entry path").to_string_lossy().into_owned();
        let mut contents = Vec::new();
        entry.read_to_end(&mut contents).expect("a readable tar entry");
        files.insert(path.trim_start_matches("./").to_owned(), contents);
    }
    files
}

fn assert_adapter_config(files: &BTreeMap<String, Vec<u8>>) {
    let config = files
        .get("adapter_config.json")
        .unwrap_or_else(|| panic!("no adapter_config.json at the root of the archive: {:?}", files.keys()));
    let config: Value = serde_json::from_slice(config).expect("adapter_config.json is JSON");

    assert_eq!(config["peft_type"], "LORA", "{config}");
    assert_eq!(config["task_type"], "CAUSAL_LM", "{config}");
    assert_eq!(config["r"], R, "{config}");
    assert_eq!(config["lora_alpha"].as_f64(), Some(ALPHA), "{config}");
    assert_eq!(config["lora_dropout"].as_f64(), Some(0.0), "{config}");
    assert_eq!(config["bias"], "none", "{config}");
    assert_eq!(config["fan_in_fan_out"], false, "{config}");
    assert_eq!(config["use_rslora"], false, "{config}");
    assert!(config["base_model_name_or_path"].is_string(), "{config}");
    let targets: BTreeSet<&str> = config["target_modules"]
        .as_array()
        .expect("target_modules is a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(targets, BTreeSet::from(TARGET_MODULES), "{config}");
}

fn assert_adapter_tensors(files: &BTreeMap<String, Vec<u8>>) {
    let weights = files
        .get("adapter_model.safetensors")
        .unwrap_or_else(|| panic!("no adapter_model.safetensors at the root of the archive: {:?}", files.keys()));
    let tensors = SafeTensors::deserialize(weights).expect("a valid safetensors file");
    let actual: BTreeMap<String, Vec<usize>> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();

    let expected = expected_tensors();
    assert_eq!(expected.len(), 240);
    let missing: Vec<&String> = expected.keys().filter(|name| !actual.contains_key(*name)).collect();
    let unexpected: Vec<&String> = actual.keys().filter(|name| !expected.contains_key(*name)).collect();
    assert!(missing.is_empty(), "missing tensors: {missing:?}");
    assert!(unexpected.is_empty(), "unexpected tensors: {unexpected:?}");
    for (name, shape) in &expected {
        assert_eq!(&actual[name], shape, "shape of {name}");
    }
}

/// PEFT's names and shapes: `lora_A` is `[r, in_features]`, `lora_B` is `[out_features, r]`.
fn expected_tensors() -> BTreeMap<String, Vec<usize>> {
    let mut expected = BTreeMap::new();
    for layer in 0..N_LAYERS {
        for module in TARGET_MODULES {
            let (in_features, out_features) = match module {
                "k_proj" | "v_proj" => (HIDDEN, KV_DIM),
                _ => (HIDDEN, HIDDEN),
            };
            let prefix = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            expected.insert(format!("{prefix}.lora_A.weight"), vec![R, in_features]);
            expected.insert(format!("{prefix}.lora_B.weight"), vec![out_features, R]);
        }
    }
    expected
}
