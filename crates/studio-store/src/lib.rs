//! Persistence and the job queue of Smart Studio: files, jobs, events, metrics and checkpoints in a
//! database, artifacts in a folder or an S3-compatible bucket, and the catalog of base models.
//!
//! All SQL of the project lives in this crate. Queries are built at run time (`sqlx::query`),
//! not with the checked macros, so a fresh clone builds without a database.

mod artifacts;
mod attempts;
mod catalog;
mod clock;
mod error;
mod event_bus;
pub mod keys;
mod pg_listener;
mod postgres;
mod records;
mod retry;
mod rows;
mod sqlite;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use artifacts::{
    ArtifactLocation, ArtifactStore, ArtifactStream, ArtifactWriter, InvalidArtifactLocation,
    S3Credentials, S3Location, S3Options, ARTIFACTS_DIR_NAME, DEFAULT_PART_SIZE,
    DEFAULT_S3_REGION, MIN_PART_SIZE,
};
pub use catalog::{BaseModel, CatalogError, ModelCatalog, ModelFormat};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::StoreError;
pub use event_bus::{EventNotice, EventSubscription};
pub use postgres::{PgStore, POSTGRES_ACQUIRE_TIMEOUT};
pub use sqlite::{sqlite_path, SqliteStore};
pub use records::{
    CancelOutcome, CheckpointRecord, EventLevel, EventRecord, EventType, FileRecord, Heartbeat,
    JobError, JobRecord, MetricPoint, NewCheckpoint, NewEvent, NewFile, NewJob, Page, PageRequest,
    PauseOutcome, RescuedJob, RewardMetrics,
};
pub use retry::{retry_delay, RETRY_BASE_DELAY, RETRY_MAX_DELAY};
pub use store::Store;

/// The Postgres migrations of `migrations/` at the repository root, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The SQLite migrations of `migrations-sqlite/` at the repository root, embedded at build time.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations-sqlite");

/// The name of the SQLite database file in the data folder when no database URL is given.
pub const SQLITE_FILE_NAME: &str = "studio.db";

/// The locations of the service's state.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// `postgres://…` for Postgres, or `sqlite://PATH` for an SQLite file;
    /// [`sqlite_url`] names the default file in the data folder.
    pub database_url: String,
    /// The artifact location. [`ArtifactLocation::in_data_dir`] names the default folder.
    pub artifacts: ArtifactLocation,
    /// Base models: `NAME.gguf` files and Hugging Face folders `NAME/`.
    pub models_dir: PathBuf,
}

/// Returns the URL of the default SQLite database, `DATA_DIR/studio.db`.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join(SQLITE_FILE_NAME).display())
}

/// Everything the API and the worker need from storage.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn Store>,
    pub artifacts: Arc<ArtifactStore>,
    pub models: ModelCatalog,
}

impl Services {
    /// Connects to the database of `settings.database_url` (Postgres or SQLite, by its scheme)
    /// and to the artifact store, checking that the store responds. It does not migrate, so call
    /// [`migrate`] first.
    pub async fn open(settings: &StoreSettings) -> Result<Services, StoreError> {
        let clock = Arc::new(SystemClock);
        let store: Arc<dyn Store> = match sqlite::sqlite_path(&settings.database_url) {
            Some(path) => Arc::new(SqliteStore::open(&path?, clock).await?),
            None => Arc::new(PgStore::new(postgres::connect(&settings.database_url).await?, clock)),
        };
        let artifacts = ArtifactStore::connect(&settings.artifacts)?;
        artifacts.check_access().await?;
        tracing::info!(artifacts = artifacts.location(), "artifact store ready");
        Ok(Services {
            store,
            artifacts: Arc::new(artifacts),
            models: ModelCatalog::new(&settings.models_dir),
        })
    }
}

/// Runs the embedded migrations of the backend that `database_url` names (`postgres://…` or
/// `sqlite://PATH`, whose file is created when missing); already applied ones are skipped.
pub async fn migrate(database_url: &str) -> Result<(), StoreError> {
    match sqlite::sqlite_path(database_url) {
        Some(path) => {
            let pool = sqlite::connect(&path?).await?;
            run_migrations(&SQLITE_MIGRATOR, &pool).await?;
            pool.close().await;
        }
        None => {
            let pool = postgres::connect(database_url).await?;
            run_migrations(&MIGRATOR, &pool).await?;
            pool.close().await;
        }
    }
    Ok(())
}

async fn run_migrations<'a, A>(migrator: &sqlx::migrate::Migrator, pool: A) -> Result<(), StoreError>
where
    A: sqlx::Acquire<'a>,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    migrator.run(pool).await.map_err(|err| match err {
        sqlx::migrate::MigrateError::Execute(err) => StoreError::from(err),
        other => StoreError::Other {
            context: "database migration failed".into(),
            source: other.into(),
        },
    })
}
