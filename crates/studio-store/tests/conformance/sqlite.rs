//! The cases on SQLiteStore, each on a fresh database file in its own temporary folder.

use std::sync::Arc;

use sqlx::Row;
use studio_store::{
    migrate, sqlite_url, ArtifactLocation, Services, SqliteStore, StoreSettings, SQLITE_FILE_NAME,
};
use tempfile::TempDir;

use crate::suite::{fixture, start_clock, Fixture};

pub struct Backend {
    pub fixture: Fixture,
    store: SqliteStore,
    _folder: TempDir,
}

impl Backend {
    /// Migrates a new database file through the public `sqlite://` URL path.
    pub async fn open() -> Option<Backend> {
        let folder = tempfile::tempdir().unwrap();
        migrate(&sqlite_url(folder.path())).await.unwrap();
        let clock = start_clock();
        let store = SqliteStore::open(&folder.path().join(SQLITE_FILE_NAME), clock.clone())
            .await
            .unwrap();
        let fixture = fixture(Arc::new(store.clone()), clock).await;
        Some(Backend {
            fixture,
            store,
            _folder: folder,
        })
    }

    pub async fn close(self) {
        self.store.pool().close().await;
    }
}

conformance_cases!();

#[tokio::test]
async fn database_uses_wal_and_foreign_keys() {
    let backend = Backend::open().await.unwrap();
    let pool = backend.store.pool();

    let journal_mode: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    let foreign_keys: i64 = sqlx::query("PRAGMA foreign_keys")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);
    let busy_timeout: i64 = sqlx::query("PRAGMA busy_timeout")
        .fetch_one(pool)
        .await
        .unwrap()
        .get(0);

    assert_eq!(journal_mode, "wal");
    assert_eq!(foreign_keys, 1);
    assert!(busy_timeout > 0, "busy_timeout is {busy_timeout} ms");
}

#[tokio::test]
async fn database_rejects_terminal_state_without_finish_time() {
    let backend = Backend::open().await.unwrap();
    let id = backend.fixture.queue_job().await;

    let result = sqlx::query("UPDATE jobs SET status = 'cancelled' WHERE id = ?1")
        .bind(id.as_str())
        .execute(backend.store.pool())
        .await;

    assert!(result.is_err());
}

#[tokio::test]
async fn services_open_sqlite_url_in_data_folder() {
    let folder = tempfile::tempdir().unwrap();
    let data_dir = folder.path().join("data");
    let settings = StoreSettings {
        database_url: sqlite_url(&data_dir),
        artifacts: ArtifactLocation::in_data_dir(&data_dir),
        models_dir: folder.path().join("models"),
    };
    migrate(&settings.database_url).await.unwrap();

    let services = Services::open(&settings).await.unwrap();
    let page = services
        .store
        .list_jobs(&studio_store::PageRequest::first(1))
        .await
        .unwrap();

    assert!(data_dir.join(SQLITE_FILE_NAME).is_file());
    assert!(data_dir.join(studio_store::ARTIFACTS_DIR_NAME).is_dir());
    assert!(page.data.is_empty());
}

#[tokio::test]
async fn migrate_rejects_in_memory_url() {
    let err = migrate("sqlite::memory:").await.unwrap_err();

    assert!(err.to_string().contains("sqlite::memory:"), "{err}");
}
