//! A throwaway PostgreSQL server of the test's own, made with `initdb` and run with `pg_ctl`
//! on a spare loopback port. Its socket folder is inside the test's temporary folder. The test
//! stops and starts it under a running job.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use crate::children::{free_port, log_tail};

/// The server's owner when the test runs as root, because PostgreSQL refuses to run as root.
const SERVER_USER: &str = "postgres";

pub struct PostgresServer {
    port: u16,
    /// `TEMP/pg`: `data/`, `socket/` and `server.log`, owned by the user that runs the server.
    root: PathBuf,
    /// Whether `initdb` and `pg_ctl` run through `runuser -u postgres --`.
    as_server_user: bool,
    running: bool,
    temp: TempDir,
}

impl PostgresServer {
    /// Creates a cluster with `initdb` (trust authentication, superuser `postgres`) and starts it.
    pub fn start() -> PostgresServer {
        let temp = tempfile::tempdir().expect("failed to create a temporary folder");
        let root = temp.path().join("pg");
        std::fs::create_dir_all(root.join("socket")).expect("failed to create the socket folder");

        let as_server_user = std::fs::metadata(temp.path())
            .expect("failed to read the temporary folder's metadata")
            .uid()
            == 0;
        if as_server_user {
            // The server's user must reach TEMP/pg through TEMP, which tempfile makes 0700.
            std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o755))
                .expect("failed to open the temporary folder to the postgres user");
            let chown = format!("{SERVER_USER}:");
            run_checked(
                Command::new("chown").args(["-R", &chown]).arg(&root),
                "chown",
            );
        }

        let mut server = PostgresServer {
            port: free_port(),
            root,
            as_server_user,
            running: false,
            temp,
        };
        let data = server.data_dir();
        server.run_tool(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        server.start_again();
        server
    }

    /// Returns the URL of the `postgres` database as its superuser, over TCP.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the stopped server and waits until it accepts connections.
    pub fn start_again(&mut self) {
        let (data, log) = (self.data_dir(), self.log_path());
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.root.join("socket").display()
        );
        self.run_tool(
            "pg_ctl",
            &[
                "start", "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &options,
            ],
        );
        self.running = true;
    }

    /// Stops the server with `pg_ctl stop -m fast`: it disconnects every client, then shuts
    /// down cleanly.
    pub fn stop(&mut self) {
        let data = self.data_dir();
        self.run_tool(
            "pg_ctl",
            &["stop", "-D", &data, "-m", "fast", "-w", "-t", "60"],
        );
        self.running = false;
    }

    fn data_dir(&self) -> String {
        self.root.join("data").display().to_string()
    }

    fn log_path(&self) -> String {
        self.root.join("server.log").display().to_string()
    }

    /// Runs `initdb` or `pg_ctl` (from `PATH`) and panics with its output when it fails.
    fn run_tool(&self, tool: &str, args: &[&str]) -> Output {
        run_checked(&mut self.tool_command(tool, args), tool)
    }

    /// Builds the command line of `tool`, run as the postgres user when the test runs as root.
    fn tool_command(&self, tool: &str, args: &[&str]) -> Command {
        let mut command = if self.as_server_user {
            let mut command = Command::new("runuser");
            command.args(["-u", SERVER_USER, "--", tool]);
            command
        } else {
            Command::new(tool)
        };
        command.args(args).current_dir(&self.root);
        command
    }
}

impl Drop for PostgresServer {
    /// Stops a server still running with `-m immediate` and prints its log when the test
    /// failed. Then the temporary folder is removed with the data.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", log_tail("postgres", Path::new(&self.log_path())));
        }
        if self.running {
            let data = self.data_dir();
            let stopped = self
                .tool_command("pg_ctl", &["stop", "-D", &data, "-m", "immediate", "-w"])
                .output();
            if !matches!(&stopped, Ok(output) if output.status.success()) {
                eprintln!(
                    "warning: failed to stop the test's PostgreSQL server in {}: {stopped:?}",
                    self.temp.path().display()
                );
            }
        }
    }
}

fn run_checked(command: &mut Command, name: &str) -> Output {
    let output = command.output().unwrap_or_else(|error| {
        panic!(
            "failed to run {name}: {error}; install PostgreSQL's server programs and put \
             initdb and pg_ctl on PATH (.ci/run starts a cluster of the same installation)"
        )
    });
    assert!(
        output.status.success(),
        "{name} failed with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
