//! `TestApp`: the REST API on an ephemeral loopback port, optionally with a worker, over a fresh
//! database and data folder, plus typed helpers for the calls the tests make.

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use studio_store::{ArtifactLocation, Services, StoreSettings};
use studio_worker::WorkerSettings;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::data;
use crate::database::TestDatabase;

pub struct TestApp {
    pub base_url: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    // Dropped after the tasks stop, so that the folder and the database outlive the server.
    data_dir: TempDir,
    _database: TestDatabase,
}

impl TestApp {
    /// Starts the REST API alone, so jobs stay queued.
    pub async fn spawn() -> TestApp {
        Self::start(false, None).await
    }

    /// Starts the REST API and one worker, as `smart-studio up` runs them.
    pub async fn spawn_with_worker() -> TestApp {
        Self::start(true, None).await
    }

    /// Starts the REST API and one worker that store artifacts in `artifacts` instead of the
    /// data folder.
    pub async fn spawn_with_worker_storing_in(artifacts: ArtifactLocation) -> TestApp {
        Self::start(true, Some(artifacts)).await
    }

    async fn start(with_worker: bool, artifacts: Option<ArtifactLocation>) -> TestApp {
        let models_dir = data::models_dir();
        let database = TestDatabase::create().await;
        let data_dir = tempfile::tempdir().expect("failed to create a temporary data folder");
        let settings = StoreSettings {
            database_url: database.url.clone(),
            artifacts: artifacts.unwrap_or_else(|| ArtifactLocation::in_data_dir(data_dir.path())),
            models_dir,
        };
        let services = Services::open(&settings)
            .await
            .unwrap_or_else(|error| panic!("failed to open services: {error}"));

        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("failed to bind an ephemeral port");
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let mut tasks = vec![tokio::spawn(serve(listener, services.clone(), shutdown.clone()))];
        if with_worker {
            let settings = WorkerSettings {
                worker_id: "e2e-worker".to_owned(),
                scratch_dir: data_dir.path().join("scratch"),
                poll_interval: Duration::from_millis(200),
                lease: Duration::from_secs(60),
                heartbeat_interval: Duration::from_secs(5),
            };
            tasks.push(tokio::spawn(work(services, settings, shutdown.clone())));
        }

        TestApp {
            base_url,
            client: reqwest::Client::new(),
            shutdown,
            tasks,
            data_dir,
            _database: database,
        }
    }

    /// Stops the server and the worker and waits for them, then drops the database.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            task.await.expect("a server or worker task panicked");
        }
    }

    /// Returns the data folder: the worker's scratch space, and the artifacts by default.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data_dir.path()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub async fn upload(&self, filename: &str, contents: &str) -> Response {
        let part = Part::bytes(contents.as_bytes().to_vec()).file_name(filename.to_owned());
        let form = Form::new().text("purpose", "fine-tune").part("file", part);
        self.client
            .post(self.url("/v1/files"))
            .multipart(form)
            .send()
            .await
            .expect("POST /v1/files failed to send")
    }

    /// Uploads a valid dataset and returns its file id.
    pub async fn upload_ok(&self, filename: &str, contents: &str) -> String {
        let response = self.upload(filename, contents).await;
        let body = expect_status(response, StatusCode::OK, "POST /v1/files").await;
        body["id"].as_str().expect("the file object has an id").to_owned()
    }

    pub async fn create_job(&self, body: &Value) -> Response {
        self.client
            .post(self.url("/v1/fine_tuning/jobs"))
            .json(body)
            .send()
            .await
            .expect("POST /v1/fine_tuning/jobs failed to send")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {path} failed to send: {error}"));
        expect_status(response, StatusCode::OK, &format!("GET {path}")).await
    }

    pub async fn get_bytes(&self, path: &str) -> Vec<u8> {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {path} failed to send: {error}"));
        let status = response.status();
        let bytes = response.bytes().await.expect("failed to read the body");
        assert_eq!(status, StatusCode::OK, "GET {path}: {}", String::from_utf8_lossy(&bytes));
        bytes.to_vec()
    }

    /// Polls the job until it leaves `validating_files`, `queued` and `running`, or panics after
    /// `timeout`.
    pub async fn wait_for_job(&self, job_id: &str, timeout: Duration) -> Value {
        let path = format!("/v1/fine_tuning/jobs/{job_id}");
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.get_json(&path).await;
            let status = job["status"].as_str().unwrap_or_default();
            if !matches!(status, "validating_files" | "queued" | "running") {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {job_id} is still {status} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Asserts the status and returns the JSON body; the body is in the message on a mismatch.
pub async fn expect_status(response: Response, expected: StatusCode, request: &str) -> Value {
    let status = response.status();
    let text = response.text().await.expect("failed to read the body");
    assert_eq!(status, expected, "{request} returned {status}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{request} returned invalid JSON ({error}): {text}"))
}

/// Returns the `error.message` of an OpenAI-style error envelope.
pub fn error_message(body: &Value) -> &str {
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {body}"))
}

async fn serve(listener: tokio::net::TcpListener, services: Services, shutdown: CancellationToken) {
    axum::serve(listener, studio_api::app(services))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .expect("the REST API server failed");
}

async fn work(services: Services, settings: WorkerSettings, shutdown: CancellationToken) {
    studio_worker::run_worker(services, settings, shutdown.cancelled_owned())
        .await
        .expect("the worker failed");
}
