//! Child processes of the real `smart-studio` binary, each killed when its guard drops (also
//! on panic), with its output in a log file whose last lines are printed when the test fails.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::api::Api;
use crate::data;

const BINARY: &str = env!("CARGO_BIN_EXE_smart-studio");
/// Lines of a child's log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
const SERVE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running child process. Dropping it sends SIGKILL and waits for the exit.
pub struct ChildProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl ChildProcess {
    /// Starts `smart-studio ARGS` with stdout and stderr appended to `LOG_DIR/NAME.log`.
    pub fn spawn(name: &str, args: &[String], log_dir: &Path) -> ChildProcess {
        let log_path = log_dir.join(format!("{name}.log"));
        let stdout = File::create(&log_path)
            .unwrap_or_else(|error| panic!("failed to create {}: {error}", log_path.display()));
        let stderr = stdout
            .try_clone()
            .expect("failed to duplicate the log file handle");

        let child = Command::new(BINARY)
            .args(args)
            // tracing-subscriber colours its output unless NO_COLOR is set, even into a file.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {BINARY} for {name}: {error}"));
        ChildProcess {
            name: name.to_owned(),
            child,
            log_path,
        }
    }

    /// Kills the process with SIGKILL, as a crash or an out-of-memory kill would end it, and
    /// waits for it to exit.
    pub fn kill(&mut self) {
        if self.exit_status().is_none() {
            self.child
                .kill()
                .unwrap_or_else(|error| panic!("failed to kill {}: {error}", self.name));
        }
        self.child
            .wait()
            .unwrap_or_else(|error| panic!("failed to wait for {}: {error}", self.name));
    }

    /// Returns the exit status once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|error| panic!("failed to check whether {} exited: {error}", self.name))
    }

    /// Returns the whole log, for checks on what the process did.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|error| {
            panic!(
                "failed to read the log {}: {error}",
                self.log_path.display()
            )
        })
    }

    /// Returns the last lines of the log under a header that names the process.
    pub fn log_tail(&self) -> String {
        log_tail(&self.name, &self.log_path)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Returns the last lines of the log file at `path` under a header that names `name`.
pub fn log_tail(name: &str, path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| format!("(failed to read {}: {error})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    format!(
        "----- last {} lines of {name} ({}) -----\n{}\n----- end of {name} -----",
        tail.len(),
        path.display(),
        tail.join("\n")
    )
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago. Another process may take it
/// before the child binds it, and then the child fails to start and the test reports its log.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("failed to bind an ephemeral port on 127.0.0.1")
        .port()
}

/// Worker timing flags: `--lease`, `--heartbeat-interval` and `--poll-interval`, in seconds.
pub struct WorkerTiming {
    pub lease: f64,
    pub heartbeat_interval: f64,
    pub poll_interval: f64,
}

/// A migrated database with `smart-studio serve` in front of it, a data folder, and the
/// options every worker of the test shares.
pub struct Stack {
    pub api: Api,
    // Fields drop in order, so the server stops before the folder that contains its log is removed.
    _serve: ChildProcess,
    paths: StackPaths,
}

impl Stack {
    /// Runs `smart-studio migrate` on `database_url`, starts `smart-studio serve` on a free
    /// port and waits until `/healthz` returns 200.
    pub async fn start(database_url: &str) -> Stack {
        let temp = tempfile::tempdir().expect("failed to create a temporary folder");
        let paths = StackPaths {
            database_url: database_url.to_owned(),
            models_dir: data::models_dir(),
            temp,
        };
        std::fs::create_dir(paths.log_dir()).expect("failed to create the logs folder");
        paths.migrate();

        let port = free_port();
        let mut args = paths.global_args();
        args.extend(["--port".to_owned(), port.to_string(), "serve".to_owned()]);
        let mut serve = ChildProcess::spawn("serve", &args, &paths.log_dir());
        let api = Api::new(format!("http://127.0.0.1:{port}"));
        api.wait_until_healthy(&mut serve, SERVE_START_TIMEOUT)
            .await;

        Stack {
            api,
            _serve: serve,
            paths,
        }
    }

    /// Starts `smart-studio worker` named `worker_id`, with a scratch folder of its own.
    pub fn start_worker(&self, worker_id: &str, timing: &WorkerTiming) -> ChildProcess {
        let scratch_dir = self.paths.temp.path().join(format!("scratch-{worker_id}"));
        let mut args = self.paths.global_args();
        args.extend([
            "worker".to_owned(),
            "--worker-id".to_owned(),
            worker_id.to_owned(),
            "--scratch-dir".to_owned(),
            scratch_dir.display().to_string(),
            "--lease".to_owned(),
            timing.lease.to_string(),
            "--heartbeat-interval".to_owned(),
            timing.heartbeat_interval.to_string(),
            "--poll-interval".to_owned(),
            timing.poll_interval.to_string(),
        ]);
        ChildProcess::spawn(worker_id, &args, &self.paths.log_dir())
    }
}

/// The database URL and folders that a stack's processes share.
struct StackPaths {
    database_url: String,
    models_dir: PathBuf,
    /// Contains `data/`, `logs/` and each worker's `scratch-ID/`.
    temp: TempDir,
}

impl StackPaths {
    fn log_dir(&self) -> PathBuf {
        self.temp.path().join("logs")
    }

    /// Options of every process. Each is a flag, so that it wins over the test's environment.
    fn global_args(&self) -> Vec<String> {
        vec![
            "--database-url".to_owned(),
            self.database_url.clone(),
            "--data-dir".to_owned(),
            self.temp.path().join("data").display().to_string(),
            "--models-dir".to_owned(),
            self.models_dir.display().to_string(),
            "--host".to_owned(),
            "127.0.0.1".to_owned(),
            "--log".to_owned(),
            "info".to_owned(),
        ]
    }

    /// Runs `smart-studio migrate` to completion, and panics when it fails or times out.
    fn migrate(&self) {
        let mut args = self.global_args();
        args.push("migrate".to_owned());
        let mut migrate = ChildProcess::spawn("migrate", &args, &self.log_dir());
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        let status = loop {
            if let Some(status) = migrate.exit_status() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "smart-studio migrate did not finish within {MIGRATE_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "smart-studio migrate failed with {status}"
        );
    }
}
