//! A uniquely named Postgres database on the server of `DATABASE_URL`, dropped when the test
//! ends, even when it panics. `psql` creates and drops it; the test migrates it with
//! `smart-studio migrate`.

use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use reqwest::Url;

pub struct TestDatabase {
    pub url: String,
    name: String,
    server_url: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        let server_url = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL is not set: export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
             (a Postgres server on which this user may create databases)",
        );
        let name = unique_name();

        let output = psql(&server_url, &format!("CREATE DATABASE {name}")).unwrap_or_else(|error| {
            panic!("failed to run psql: {error}; install the PostgreSQL client and put psql on PATH")
        });
        assert!(
            output.status.success(),
            "failed to create database {name} on the server of DATABASE_URL: {}",
            String::from_utf8_lossy(&output.stderr)
        );

        let mut url = Url::parse(&server_url).expect("DATABASE_URL is not a valid URL");
        url.set_path(&name);
        TestDatabase {
            url: url.to_string(),
            name,
            server_url,
        }
    }
}

impl Drop for TestDatabase {
    /// Drops the database. `WITH (FORCE)` closes the connections of killed children.
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        match psql(&self.server_url, &statement) {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "warning: failed to drop test database {}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!(
                "warning: failed to drop test database {}: {error}",
                self.name
            ),
        }
    }
}

/// Runs one SQL statement with `psql`, without reading `~/.psqlrc`.
fn psql(url: &str, statement: &str) -> std::io::Result<Output> {
    Command::new("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            statement,
        ])
        .output()
}

/// Builds a database name from the process id and the clock, so that test runs on one server
/// do not collide.
fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    format!("studio_processes_{}_{nanos}", std::process::id())
}
