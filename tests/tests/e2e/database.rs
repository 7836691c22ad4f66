//! A uniquely named Postgres database per test, created on the server of `DATABASE_URL`,
//! migrated, and dropped when the test ends, even when it panics.

use reqwest::Url;
use sqlx::{Connection, Executor, PgConnection};

pub struct TestDatabase {
    pub url: String,
    name: String,
    server_url: String,
}

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let server_url = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL is not set: export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
             (a Postgres server on which this user may create databases)",
        );
        let name = format!("studio_e2e_{}", uuid::Uuid::new_v4().simple());

        let mut connection = PgConnection::connect(&server_url)
            .await
            .expect("failed to connect to the Postgres server of DATABASE_URL");
        connection
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|error| panic!("failed to create database {name}: {error}"));
        connection.close().await.ok();

        let mut url = Url::parse(&server_url).expect("DATABASE_URL is not a valid URL");
        url.set_path(&name);
        let url = url.to_string();
        studio_store::migrate(&url)
            .await
            .unwrap_or_else(|error| panic!("failed to migrate database {name}: {error}"));

        TestDatabase {
            url,
            name,
            server_url,
        }
    }
}

impl Drop for TestDatabase {
    /// Drops the database on a thread of its own, because `Drop` cannot await and the test's
    /// runtime may be shutting down. `WITH (FORCE)` closes connections a pool still holds.
    fn drop(&mut self) {
        let server_url = self.server_url.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("failed to build a runtime to drop the test database");
            runtime.block_on(async {
                let mut connection = PgConnection::connect(&server_url).await?;
                connection.execute(statement.as_str()).await?;
                connection.close().await
            })
        })
        .join();

        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: failed to drop test database {}", self.name);
        }
    }
}
