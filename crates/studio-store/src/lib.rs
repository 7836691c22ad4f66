//! Persistence and the job queue of Smart Studio: files, jobs, events, metrics and checkpoints in a
//! database, artifacts in a folder, and the catalog of base models.
//!
//! All SQL of the project lives in this crate. Queries are built at run time (`sqlx::query`),
//! not with the checked macros, so a fresh clone builds without a database.

mod artifacts;
mod catalog;
mod clock;
mod error;
pub mod keys;
mod postgres;
mod records;
mod store;

use std::path::PathBuf;
use std::sync::Arc;

pub use artifacts::{ArtifactStore, ArtifactWriter};
pub use catalog::{BaseModel, CatalogError, ModelCatalog, ModelFormat};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::StoreError;
pub use postgres::PgStore;
pub use records::{
    CancelOutcome, CheckpointRecord, EventLevel, EventRecord, EventType, FileRecord, Heartbeat,
    JobError, JobRecord, MetricPoint, NewCheckpoint, NewEvent, NewFile, NewJob, Page, PageRequest,
    RescuedJob,
};
pub use store::Store;

/// The migrations of `migrations/` at the repository root, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The locations of the service's state.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// `postgres://…`.
    pub database_url: String,
    /// Artifacts go to `data_dir/artifacts`.
    pub data_dir: PathBuf,
    /// Base models: `NAME.gguf` files and Hugging Face folders `NAME/`.
    pub models_dir: PathBuf,
}

/// Everything the API and the worker need from storage.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn Store>,
    pub artifacts: Arc<ArtifactStore>,
    pub models: ModelCatalog,
}

impl Services {
    /// Connects to the database and prepares the artifact folder. It does not migrate; call
    /// [`migrate`] first.
    pub async fn open(settings: &StoreSettings) -> Result<Services, StoreError> {
        let pool = postgres::connect(&settings.database_url).await?;
        let artifacts = ArtifactStore::new(settings.data_dir.join("artifacts"));
        tokio::fs::create_dir_all(artifacts.root()).await?;
        Ok(Services {
            store: Arc::new(PgStore::new(pool, Arc::new(SystemClock))),
            artifacts: Arc::new(artifacts),
            models: ModelCatalog::new(&settings.models_dir),
        })
    }
}

/// Runs the embedded migrations against `database_url`; already applied ones are skipped.
pub async fn migrate(database_url: &str) -> Result<(), StoreError> {
    let pool = postgres::connect(database_url).await?;
    MIGRATOR.run(&pool).await.map_err(|err| match err {
        sqlx::migrate::MigrateError::Execute(err) => StoreError::from(err),
        other => StoreError::Other {
            context: "database migration failed".into(),
            source: other.into(),
        },
    })?;
    pool.close().await;
    Ok(())
}
