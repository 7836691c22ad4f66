//! A client of the REST API that `smart-studio serve` runs, with the calls the tests make and
//! a report of a job's state for failure messages.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use serde_json::Value;

use crate::children::ChildProcess;

/// Longer than the store's 10-second wait for a database connection, so that a request made
/// while the database is down gets the server's response instead of a client time-out.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// `limit` of list requests: the API's maximum page size.
const PAGE_LIMIT: u32 = 100;

pub const TERMINAL_STATUSES: [&str; 3] = ["succeeded", "failed", "cancelled"];

pub struct Api {
    base_url: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(base_url: String) -> Api {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("failed to build the HTTP client");
        Api { base_url, client }
    }

    /// Polls `/healthz` until it returns 200, and panics when `serve` exits or `timeout` passes.
    pub async fn wait_until_healthy(&self, serve: &mut ChildProcess, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = serve.exit_status() {
                panic!("smart-studio serve exited with {status} before /healthz returned 200");
            }
            let last = match self.get("/healthz").await {
                Ok(response) if response.status() == StatusCode::OK => return,
                Ok(response) => format!("status {}", response.status()),
                Err(error) => error.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "{}/healthz did not return 200 within {timeout:?}; last response: {last}",
                self.base_url
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Result<Response> {
        self.client
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
    }

    /// GETs `path` and returns its JSON body, or panics unless the status is 200.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .get(path)
            .await
            .unwrap_or_else(|error| panic!("GET {path} failed: {error}"));
        expect_ok(response, &format!("GET {path}")).await
    }

    /// GETs `path` and returns its body, or panics unless the status is 200.
    pub async fn get_bytes(&self, path: &str) -> Vec<u8> {
        let response = self
            .get(path)
            .await
            .unwrap_or_else(|error| panic!("GET {path} failed: {error}"));
        let status = response.status();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|error| panic!("failed to read the body of GET {path}: {error}"));
        assert_eq!(
            status,
            StatusCode::OK,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        body.to_vec()
    }

    /// Uploads `jsonl` as a fine-tune file and returns its id.
    pub async fn upload(&self, filename: &str, jsonl: &str) -> String {
        let part = Part::bytes(jsonl.as_bytes().to_vec())
            .file_name(filename.to_owned())
            .mime_str("application/jsonl")
            .expect("a valid MIME type");
        let form = Form::new().text("purpose", "fine-tune").part("file", part);
        let response = self
            .client
            .post(format!("{}/v1/files", self.base_url))
            .multipart(form)
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST /v1/files failed: {error}"));
        let file = expect_ok(response, "POST /v1/files").await;
        file["id"]
            .as_str()
            .unwrap_or_else(|| panic!("the uploaded file has no id: {file}"))
            .to_owned()
    }

    /// Creates a fine-tuning job and returns its id.
    pub async fn create_job(&self, body: &Value) -> String {
        let response = self
            .client
            .post(format!("{}/v1/fine_tuning/jobs", self.base_url))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("POST /v1/fine_tuning/jobs failed: {error}"));
        let job = expect_ok(response, "POST /v1/fine_tuning/jobs").await;
        job["id"]
            .as_str()
            .unwrap_or_else(|| panic!("the created job has no id: {job}"))
            .to_owned()
    }

    pub async fn job(&self, job_id: &str) -> Value {
        self.get_json(&format!("/v1/fine_tuning/jobs/{job_id}"))
            .await
    }

    /// Returns every event of the job, oldest first.
    pub async fn events(&self, job_id: &str) -> Vec<Value> {
        let mut events = self
            .all_pages(&format!("/v1/fine_tuning/jobs/{job_id}/events"))
            .await;
        // The API lists events newest first, as OpenAI does.
        events.reverse();
        events
    }

    /// Returns every checkpoint of the job, latest step first.
    pub async fn checkpoints(&self, job_id: &str) -> Vec<Value> {
        self.all_pages(&format!("/v1/fine_tuning/jobs/{job_id}/checkpoints"))
            .await
    }

    /// Returns the job's metric rows, one per step, ordered by step.
    pub async fn metrics(&self, job_id: &str) -> Vec<Value> {
        let metrics = self
            .get_json(&format!("/v1/fine_tuning/jobs/{job_id}/metrics"))
            .await;
        list_data(&metrics)
    }

    /// Follows `after` through every page of a list.
    async fn all_pages(&self, path: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let query = match &after {
                Some(id) => format!("?limit={PAGE_LIMIT}&after={id}"),
                None => format!("?limit={PAGE_LIMIT}"),
            };
            let page = self.get_json(&format!("{path}{query}")).await;
            let data = list_data(&page);
            let has_more = page["has_more"]
                .as_bool()
                .unwrap_or_else(|| panic!("GET {path}{query}: has_more is not a boolean: {page}"));
            after = data
                .last()
                .and_then(|item| item["id"].as_str())
                .map(str::to_owned);
            items.extend(data);
            if !has_more || after.is_none() {
                return items;
            }
        }
    }

    /// Polls the job until its status is terminal and returns it. Failed requests (a 503 while
    /// the database restarts) are retried until the deadline, and then the panic message reports
    /// the job and the last response.
    pub async fn wait_until_finished(&self, job_id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let path = format!("/v1/fine_tuning/jobs/{job_id}");
        loop {
            let last = match self.get(&path).await {
                Ok(response) if response.status() == StatusCode::OK => {
                    let job: Value = response
                        .json()
                        .await
                        .unwrap_or_else(|error| panic!("GET {path}: invalid JSON: {error}"));
                    let status = job["status"].as_str().unwrap_or_default();
                    if TERMINAL_STATUSES.contains(&status) {
                        return job;
                    }
                    format!("status {status}")
                }
                Ok(response) => format!("HTTP {}", response.status()),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                panic!(
                    "job {job_id} did not finish within {timeout:?}; last response: {last}\n{}",
                    self.report(job_id).await
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Describes the job, its events and its metric steps for a failure message. It never
    /// panics: a request that fails is reported in place of its result.
    pub async fn report(&self, job_id: &str) -> String {
        let mut report = format!("----- job {job_id} -----\n");
        let job_path = format!("/v1/fine_tuning/jobs/{job_id}");
        report.push_str(&format!("job: {}\n", self.describe(&job_path).await));

        let events_path = format!("{job_path}/events?limit={PAGE_LIMIT}");
        match self.try_json(&events_path).await {
            Ok(page) => {
                let mut events = list_data(&page);
                events.reverse();
                report.push_str(&format!("last {} events, oldest first:\n", events.len()));
                for event in events {
                    report.push_str(&format!("  [{}] {}\n", event["level"], event["message"]));
                }
            }
            Err(error) => report.push_str(&format!("events: {error}\n")),
        }

        match self.try_json(&format!("{job_path}/metrics")).await {
            Ok(metrics) => {
                let steps: Vec<&Value> = metrics["data"]
                    .as_array()
                    .map(|data| data.iter().map(|point| &point["step"]).collect())
                    .unwrap_or_default();
                report.push_str(&format!("metric steps: {steps:?}\n"));
            }
            Err(error) => report.push_str(&format!("metrics: {error}\n")),
        }
        report.push_str(&format!(
            "checkpoints: {}\n",
            self.describe(&format!("{job_path}/checkpoints")).await
        ));
        report
    }

    async fn describe(&self, path: &str) -> String {
        match self.try_json(path).await {
            Ok(value) => value.to_string(),
            Err(error) => error,
        }
    }

    async fn try_json(&self, path: &str) -> Result<Value, String> {
        let response = self
            .get(path)
            .await
            .map_err(|error| format!("GET {path} failed: {error}"))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|error| format!("GET {path}: failed to read the body: {error}"))?;
        if status != StatusCode::OK {
            return Err(format!("GET {path}: HTTP {status}: {body}"));
        }
        serde_json::from_str(&body)
            .map_err(|error| format!("GET {path}: invalid JSON ({error}): {body}"))
    }
}

/// Returns the JSON body of a 200 response, or panics with the status and body otherwise.
pub async fn expect_ok(response: Response, request: &str) -> Value {
    let status = response.status();
    let body = response
        .text()
        .await
        .unwrap_or_else(|error| panic!("{request}: failed to read the body: {error}"));
    assert_eq!(status, StatusCode::OK, "{request}: {body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("{request}: invalid JSON ({error}): {body}"))
}

/// Returns the `data` array of a list object.
fn list_data(list: &Value) -> Vec<Value> {
    list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not a list object: {list}"))
        .clone()
}

/// Returns the messages of `events` in their order.
pub fn messages(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|event| {
            event["message"]
                .as_str()
                .unwrap_or_else(|| panic!("an event has no message: {event}"))
        })
        .collect()
}

/// Returns `(step, train_loss)` of every metric row, in the API's order.
pub fn losses(metrics: &[Value]) -> Vec<(u64, f64)> {
    metrics
        .iter()
        .map(|point| {
            let step = point["step"]
                .as_u64()
                .unwrap_or_else(|| panic!("a metric row has no step: {point}"));
            let loss = point["train_loss"]
                .as_f64()
                .unwrap_or_else(|| panic!("a metric row has no numeric train_loss: {point}"));
            (step, loss)
        })
        .collect()
}

/// Asserts that the loss curve has each step of `1..=total_steps` exactly once, in order, with
/// a finite loss.
pub fn assert_complete_loss_curve(metrics: &[Value], total_steps: u64) {
    let points = losses(metrics);
    let steps: Vec<u64> = points.iter().map(|(step, _)| *step).collect();
    let expected: Vec<u64> = (1..=total_steps).collect();
    assert_eq!(
        steps, expected,
        "the metric steps are not 1..={total_steps}, each once"
    );
    for (step, loss) in points {
        assert!(loss.is_finite(), "the loss of step {step} is {loss}");
    }
}

/// Extracts a tar archive into a map from file name to contents.
pub fn untar(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
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
        files.insert(path.trim_start_matches("./").to_owned(), contents);
    }
    files
}

/// Downloads the job's final adapter and checks that it is a PEFT adapter of rank `r` with one
/// `lora_A` and one `lora_B` per target module of each of the model's 30 layers.
pub async fn assert_adapter_downloads(api: &Api, job_id: &str, r: u64) {
    let archive = api
        .get_bytes(&format!(
            "/v1/fine_tuning/jobs/{job_id}/download?artifact=adapter"
        ))
        .await;
    let files = untar(&archive);

    let config = files
        .get("adapter_config.json")
        .unwrap_or_else(|| panic!("no adapter_config.json in the archive: {:?}", files.keys()));
    let config: Value = serde_json::from_slice(config).expect("adapter_config.json is JSON");
    assert_eq!(config["peft_type"], "LORA", "{config}");
    assert_eq!(config["r"].as_u64(), Some(r), "{config}");

    let weights = files.get("adapter_model.safetensors").unwrap_or_else(|| {
        panic!(
            "no adapter_model.safetensors in the archive: {:?}",
            files.keys()
        )
    });
    let names = safetensors_names(weights);
    let n_modules = config["target_modules"]
        .as_array()
        .unwrap_or_else(|| panic!("target_modules is not a list: {config}"))
        .len();
    // SmolLM2-135M has 30 layers; each target module gets an A and a B matrix.
    let n_lora_a = names
        .iter()
        .filter(|name| name.ends_with(".lora_A.weight"))
        .count();
    let n_lora_b = names
        .iter()
        .filter(|name| name.ends_with(".lora_B.weight"))
        .count();
    assert_eq!(n_lora_a, 30 * n_modules, "lora_A tensors in {names:?}");
    assert_eq!(n_lora_b, 30 * n_modules, "lora_B tensors in {names:?}");
}

/// Returns the tensor names of a safetensors file: its first 8 bytes are the little-endian
/// length of a JSON header that maps each name to its dtype, shape and offsets.
fn safetensors_names(file: &[u8]) -> Vec<String> {
    assert!(
        file.len() >= 8,
        "the safetensors file has {} bytes",
        file.len()
    );
    let header_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let header = file
        .get(8..8 + header_len)
        .unwrap_or_else(|| panic!("the safetensors header of {header_len} bytes is cut short"));
    let header: Value = serde_json::from_slice(header).expect("the safetensors header is JSON");
    header
        .as_object()
        .expect("the safetensors header is a JSON object")
        .keys()
        .filter(|name| *name != "__metadata__")
        .cloned()
        .collect()
}
