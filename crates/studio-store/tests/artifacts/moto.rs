//! `MotoServer`: moto's S3 server (`moto_server`) on a free loopback port with one empty bucket,
//! killed on drop. Shared by the S3 tests of studio-store and the end-to-end tests.
//!
//! The program is `STUDIO_TEST_MOTO`, or `.venv-ci/bin/moto_server` at the repository root,
//! where `.ci/run` installs it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use studio_store::{ArtifactLocation, S3Credentials, S3Location, DEFAULT_S3_REGION};
use tempfile::TempDir;

/// moto accepts any credentials. The two differ, so a test can tell whether the secret leaks.
pub const ACCESS_KEY_ID: &str = "moto-access-key-id";
pub const SECRET_ACCESS_KEY: &str = "moto-secret-access-key";

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct MotoServer {
    pub endpoint: String,
    pub bucket: String,
    child: Child,
    log: PathBuf,
    _log_dir: TempDir,
}

impl MotoServer {
    /// Starts the server, waits until it responds and creates the bucket `artifacts`.
    pub async fn start() -> MotoServer {
        let program = moto_program();
        let log_dir = tempfile::tempdir().expect("failed to create a folder for the moto log");
        let log = log_dir.path().join("moto.log");
        let log_file = std::fs::File::create(&log).expect("failed to create the moto log");
        let port = free_port();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("failed to share the moto log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {}: {error}", program.display()));
        let mut server = MotoServer {
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "artifacts".to_owned(),
            child,
            log,
            _log_dir: log_dir,
        };
        server.wait_until_ready().await;
        server.create_bucket().await;
        server
    }

    /// Returns the location of the bucket under `prefix`, with moto's credentials.
    pub fn location(&self, prefix: &str) -> ArtifactLocation {
        ArtifactLocation::S3(S3Location {
            bucket: self.bucket.clone(),
            prefix: prefix.to_owned(),
            endpoint: Some(self.endpoint.clone()),
            region: DEFAULT_S3_REGION.to_owned(),
            credentials: S3Credentials {
                access_key_id: ACCESS_KEY_ID.to_owned(),
                secret_access_key: SECRET_ACCESS_KEY.to_owned(),
                session_token: None,
            },
        })
    }

    /// Lists every object key in the bucket, prefix included, sorted, with its size.
    pub async fn objects(&self) -> Vec<(String, u64)> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;

        let bucket = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(DEFAULT_S3_REGION)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .build()
            .expect("failed to build an S3 client for moto");
        let mut objects: Vec<(String, u64)> = bucket
            .list(None)
            .map_ok(|meta| (meta.location.to_string(), meta.size))
            .try_collect()
            .await
            .unwrap_or_else(|error| panic!("failed to list bucket {}: {error}", self.bucket));
        objects.sort();
        objects
    }

    /// Counts the multipart uploads that were started and neither completed nor aborted.
    pub async fn pending_uploads(&self) -> usize {
        let url = format!("{}/{}?uploads", self.endpoint, self.bucket);
        let body = reqwest::get(&url)
            .await
            .and_then(|response| response.error_for_status())
            .unwrap_or_else(|error| panic!("GET {url} failed: {error}"))
            .text()
            .await
            .expect("failed to read the list of multipart uploads");
        body.matches("<UploadId>").count()
    }

    async fn wait_until_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait().expect("failed to poll moto_server") {
                panic!(
                    "moto_server exited with {status} before answering; its log:\n{}",
                    self.log_text()
                );
            }
            if client.get(&self.endpoint).send().await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto_server did not answer on {} within {STARTUP_TIMEOUT:?}; its log:\n{}",
                self.endpoint,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn create_bucket(&self) {
        let url = format!("{}/{}", self.endpoint, self.bucket);
        reqwest::Client::new()
            .put(&url)
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .unwrap_or_else(|error| panic!("PUT {url} failed to create the bucket: {error}"));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns `STUDIO_TEST_MOTO` (relative to the repository root) or the virtualenv of `.ci/run`;
/// panics with the install command when the program is missing.
fn moto_program() -> PathBuf {
    let root = repo_root();
    let program = match std::env::var_os("STUDIO_TEST_MOTO") {
        Some(path) => root.join(path),
        None => root.join(".venv-ci/bin/moto_server"),
    };
    assert!(
        program.is_file(),
        "the S3 test server {} is missing: install it with \
         `python3 -m venv .venv-ci && .venv-ci/bin/pip install 'moto[server]==5.2.6'` at the \
         repository root, or set STUDIO_TEST_MOTO to the path of moto_server",
        program.display()
    );
    program
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .expect("the package sits inside the workspace, which has a Cargo.lock")
        .to_owned()
}

/// Returns a loopback port that was free a moment ago. Another process may take it before moto
/// binds it; the start then fails with moto's log.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("failed to find a free loopback port")
        .port()
}
