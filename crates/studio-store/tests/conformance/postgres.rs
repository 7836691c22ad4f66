//! The cases on PgStore, each in a fresh database created on the server of `DATABASE_URL`.
//! Without `DATABASE_URL`, or with an unreachable server, they fail rather than pass unseen, as
//! every other Postgres test of the workspace does.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use studio_store::{EventLevel, EventNotice, NewEvent, PgStore, Store, MIGRATOR};
use tokio::time::timeout;

use crate::suite::{fixture, start_clock, Fixture, LEASE, WAKE_TIMEOUT};

pub struct Backend {
    pub fixture: Fixture,
    pool: PgPool,
    admin: PgPool,
    database: String,
}

impl Backend {
    /// Creates and migrates a database of its own, so cases run in parallel. Panics when
    /// `DATABASE_URL` is unset, so a missing server never passes as a skipped test.
    pub async fn open() -> Option<Backend> {
        let Ok(url) = std::env::var("DATABASE_URL") else {
            panic!("DATABASE_URL is not set; point it at a Postgres server, for example postgres://postgres@127.0.0.1:5432/test");
        };
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .unwrap_or_else(|err| {
                panic!("DATABASE_URL is set but Postgres cannot be reached: {err}; start the server")
            });
        // NOTE: a case that panics leaves its database behind; they are named for cleanup.
        let database = format!("studio_conformance_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await
            .expect("the DATABASE_URL user needs the CREATEDB privilege");
        let options: PgConnectOptions = url.parse().unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(options.database(&database))
            .await
            .unwrap();
        MIGRATOR.run(&pool).await.unwrap();

        let clock = start_clock();
        let fixture = fixture(Arc::new(PgStore::new(pool.clone(), clock.clone())), clock).await;
        Some(Backend {
            fixture,
            pool,
            admin,
            database,
        })
    }

    pub async fn close(self) {
        self.pool.close().await;
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.database))
            .execute(&self.admin)
            .await
            .unwrap();
    }
}

conformance_cases!();

#[tokio::test]
async fn claim_skips_locked_job() {
    let Some(backend) = Backend::open().await else {
        return;
    };
    let f = &backend.fixture;
    let first = f.queue_job().await;
    let second = f.queue_job().await;

    // Another transaction holds the row lock of the oldest job, as a concurrent claim would.
    let mut tx = backend.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(first.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
    let job = f.store.claim_job("w1", LEASE).await.unwrap().unwrap();
    tx.rollback().await.unwrap();

    assert_eq!(job.id, second);
    backend.close().await;
}

#[tokio::test]
async fn database_rejects_terminal_state_without_finish_time() {
    let Some(backend) = Backend::open().await else {
        return;
    };
    let id = backend.fixture.queue_job().await;

    let result = sqlx::query("UPDATE jobs SET status = 'cancelled' WHERE id = $1")
        .bind(id.as_str())
        .execute(&backend.pool)
        .await;

    assert!(result.is_err());
    backend.close().await;
}

#[tokio::test]
async fn notify_wakes_store_on_another_pool() {
    let Some(backend) = Backend::open().await else {
        return;
    };
    let f = &backend.fixture;
    let id = f.queue_job().await;
    // A second pool and store stand for a worker in another process.
    let writer_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(backend.pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let writer = PgStore::new(writer_pool.clone(), f.clock.clone());
    let mut subscription = f.store.subscribe_events().await.unwrap();

    writer
        .insert_event(&NewEvent::message(&id, EventLevel::Info, "from elsewhere"))
        .await
        .unwrap();
    let notice = timeout(WAKE_TIMEOUT, subscription.recv()).await;

    assert_eq!(notice, Ok(Some(EventNotice::Inserted(id))));
    writer_pool.close().await;
    backend.close().await;
}

#[tokio::test]
async fn listener_reconnects_after_connection_is_killed() {
    let Some(backend) = Backend::open().await else {
        return;
    };
    let f = &backend.fixture;
    let id = f.queue_job().await;
    let mut subscription = f.store.subscribe_events().await.unwrap();

    // The server ends the listening session, as a restart would.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&backend.pool)
    .await
    .unwrap();
    let missed = timeout(WAKE_TIMEOUT, subscription.recv()).await;
    f.store
        .insert_event(&NewEvent::message(&id, EventLevel::Info, "after the restart"))
        .await
        .unwrap();
    let inserted = timeout(WAKE_TIMEOUT, subscription.recv()).await;

    assert_eq!(killed, [true], "exactly one listening session was expected");
    assert_eq!(missed, Ok(Some(EventNotice::Missed)));
    assert_eq!(inserted, Ok(Some(EventNotice::Inserted(id))));
    backend.close().await;
}

#[tokio::test]
async fn terminated_session_is_unavailable() {
    let Some(backend) = Backend::open().await else {
        return;
    };
    let mut connection = backend.pool.acquire().await.unwrap();

    // The server ends the session as on a shutdown, with SQLSTATE 57P01 (admin_shutdown).
    let err = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
        .execute(&mut *connection)
        .await
        .unwrap_err();
    let code = err
        .as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned());
    let err = studio_store::StoreError::from(err);

    assert_eq!(code.as_deref(), Some("57P01"));
    assert!(matches!(err, studio_store::StoreError::Unavailable(_)), "{err:?}");
    drop(connection);
    backend.close().await;
}
