//! A small client of the Smart Studio REST API, with only request the demo calls. It decodes just
//! the response fields it prints, so that extra fields never break it.

use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::multipart::{Form, Part};
use reqwest::{Response, Url};
use serde::Deserialize;
use serde_json::Value;

pub struct StudioClient {
    http: reqwest::Client,
    base_url: Url,
}

#[derive(Debug, Deserialize)]
pub struct FileObject {
    pub id: String,
}

#[derive(Debug, Deserialize)]
pub struct Job {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub trained_tokens: Option<u64>,
    #[serde(default)]
    pub fine_tuned_model: Option<String>,
    #[serde(default)]
    pub error: Option<JobError>,
}

#[derive(Debug, Deserialize)]
pub struct JobError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
}

/// One optimizer step of a job's loss curve.
#[derive(Clone, Debug, Deserialize)]
pub struct Metric {
    pub step: u64,
    pub epoch: f64,
    pub train_loss: f64,
    #[serde(default)]
    pub learning_rate: Option<f64>,
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub level: Option<String>,
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct List<T> {
    data: Vec<T>,
}

impl StudioClient {
    pub fn new(base_url: Url) -> anyhow::Result<StudioClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(StudioClient { http, base_url })
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// Polls `GET /healthz` until it returns 200 or `timeout` passes.
    pub async fn wait_until_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let response = self.http.get(self.url("healthz")?).send().await;
            if matches!(&response, Ok(response) if response.status().is_success()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the REST API at {} did not become healthy within {timeout:?}", self.base_url);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Uploads a JSONL dataset with `purpose=fine-tune`.
    pub async fn upload_file(&self, filename: &str, contents: Vec<u8>) -> anyhow::Result<FileObject> {
        let part = Part::bytes(contents)
            .file_name(filename.to_owned())
            .mime_str("application/jsonl")?;
        let form = Form::new().text("purpose", "fine-tune").part("file", part);

        let response = self.http.post(self.url("v1/files")?).multipart(form).send().await;
        decode(response, "POST /v1/files").await
    }

    pub async fn create_job(&self, body: &Value) -> anyhow::Result<Job> {
        let response = self
            .http
            .post(self.url("v1/fine_tuning/jobs")?)
            .json(body)
            .send()
            .await;
        decode(response, "POST /v1/fine_tuning/jobs").await
    }

    pub async fn job(&self, job_id: &str) -> anyhow::Result<Job> {
        let path = format!("v1/fine_tuning/jobs/{job_id}");
        let response = self.http.get(self.url(&path)?).send().await;
        decode(response, &format!("GET /{path}")).await
    }

    pub async fn cancel_job(&self, job_id: &str) -> anyhow::Result<Job> {
        let path = format!("v1/fine_tuning/jobs/{job_id}/cancel");
        let response = self.http.post(self.url(&path)?).send().await;
        decode(response, &format!("POST /{path}")).await
    }

    /// Fetches the job's loss curve, in step order.
    pub async fn metrics(&self, job_id: &str) -> anyhow::Result<Vec<Metric>> {
        let path = format!("v1/fine_tuning/jobs/{job_id}/metrics");
        let response = self.http.get(self.url(&path)?).send().await;
        let mut list: List<Metric> = decode(response, &format!("GET /{path}")).await?;
        list.data.sort_by_key(|metric| metric.step);
        Ok(list.data)
    }

    /// Fetches the job's events, oldest first.
    pub async fn events(&self, job_id: &str) -> anyhow::Result<Vec<Event>> {
        let path = format!("v1/fine_tuning/jobs/{job_id}/events");
        let mut url = self.url(&path)?;
        url.query_pairs_mut().append_pair("limit", "100");
        let response = self.http.get(url).send().await;
        let list: List<Event> = decode(response, &format!("GET /{path}")).await?;

        // OpenAI's API lists events newest first.
        let mut events = list.data;
        events.reverse();
        events.sort_by_key(|event| event.created_at);
        Ok(events)
    }

    /// Downloads the final LoRA adapter as a tar archive.
    pub async fn download_adapter(&self, job_id: &str) -> anyhow::Result<Vec<u8>> {
        let path = format!("v1/fine_tuning/jobs/{job_id}/download");
        let mut url = self.url(&path)?;
        url.query_pairs_mut().append_pair("artifact", "adapter");
        let request = format!("GET /{path}?artifact=adapter");

        let response = check(self.http.get(url).send().await, &request).await?;
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{request}: failed to read the response body"))?;
        Ok(bytes.to_vec())
    }

    fn url(&self, path: &str) -> anyhow::Result<Url> {
        self.base_url
            .join(path)
            .with_context(|| format!("invalid API path {path:?}"))
    }
}

/// Fails on a transport error or a non-2xx status, with the API's error message.
async fn check(response: reqwest::Result<Response>, request: &str) -> anyhow::Result<Response> {
    let response = response.with_context(|| format!("{request}: the request failed"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }

    let body = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|envelope| envelope["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    bail!("{request} returned {status}: {message}")
}

async fn decode<T: serde::de::DeserializeOwned>(
    response: reqwest::Result<Response>,
    request: &str,
) -> anyhow::Result<T> {
    let response = check(response, request).await?;
    response
        .json()
        .await
        .with_context(|| format!("{request}: unexpected response body"))
}
