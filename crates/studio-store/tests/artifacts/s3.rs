//! The cases on moto's S3 server, each with its own server and bucket, under a key prefix.

use studio_store::{migrate, sqlite_url, ArtifactLocation, ArtifactStore, Services, StoreSettings};

use crate::moto::MotoServer;
use crate::suite::{Backend, PART_SIZE};

const PREFIX: &str = "team-a/artifacts";

pub struct S3Backend {
    store: ArtifactStore,
    server: MotoServer,
}

async fn open_backend() -> S3Backend {
    let server = MotoServer::start().await;
    let store = ArtifactStore::connect(&server.location(PREFIX))
        .unwrap()
        .with_part_size(PART_SIZE);
    S3Backend { store, server }
}

impl Backend for S3Backend {
    fn store(&self) -> &ArtifactStore {
        &self.store
    }

    fn stored_name(&self, key: &str) -> String {
        format!("{PREFIX}/{key}")
    }

    async fn stored(&self) -> Vec<(String, u64)> {
        self.server.objects().await
    }

    async fn pending_uploads(&self) -> usize {
        self.server.pending_uploads().await
    }
}

artifact_cases!();

#[tokio::test]
async fn check_access_passes_for_existing_bucket() {
    let backend = open_backend().await;

    backend.store().check_access().await.unwrap();
}

#[tokio::test]
async fn check_access_names_missing_bucket() {
    let server = MotoServer::start().await;
    let ArtifactLocation::S3(mut location) = server.location(PREFIX) else {
        unreachable!("MotoServer::location returns an S3 location");
    };
    location.bucket = "no-such-bucket".to_owned();
    let store = ArtifactStore::connect(&ArtifactLocation::S3(location)).unwrap();

    let error = store.check_access().await.unwrap_err();

    let message = error.to_string();
    assert!(
        message.contains("s3://no-such-bucket/team-a/artifacts"),
        "{message}"
    );
    assert!(message.contains("not reachable"), "{message}");
}

#[tokio::test]
async fn location_display_hides_credentials() {
    let server = MotoServer::start().await;
    let location = server.location(PREFIX);

    let store = ArtifactStore::connect(&location).unwrap();

    assert_eq!(
        store.location(),
        format!(
            "s3://artifacts/{PREFIX} (endpoint {}, region us-east-1)",
            server.endpoint
        )
    );
    assert!(!format!("{location:?}").contains(crate::moto::SECRET_ACCESS_KEY));
}

#[tokio::test]
async fn services_open_uses_bucket() {
    let server = MotoServer::start().await;
    let folder = tempfile::tempdir().unwrap();
    let settings = StoreSettings {
        database_url: sqlite_url(folder.path()),
        artifacts: server.location(PREFIX),
        models_dir: folder.path().join("models"),
    };
    migrate(&settings.database_url).await.unwrap();

    let services = Services::open(&settings).await.unwrap();
    services
        .artifacts
        .put_bytes("files/file-1", b"abc")
        .await
        .unwrap();

    assert_eq!(
        server.objects().await,
        [(format!("{PREFIX}/files/file-1"), 3)]
    );
    assert!(!folder.path().join("artifacts").exists());
}

#[tokio::test]
async fn services_open_fails_on_missing_bucket() {
    let server = MotoServer::start().await;
    let folder = tempfile::tempdir().unwrap();
    let ArtifactLocation::S3(mut location) = server.location(PREFIX) else {
        unreachable!("MotoServer::location returns an S3 location");
    };
    location.bucket = "no-such-bucket".to_owned();
    let settings = StoreSettings {
        database_url: sqlite_url(folder.path()),
        artifacts: ArtifactLocation::S3(location),
        models_dir: folder.path().join("models"),
    };
    migrate(&settings.database_url).await.unwrap();

    let error = Services::open(&settings)
        .await
        .err()
        .expect("Services::open must fail");

    assert!(error.to_string().contains("no-such-bucket"), "{error}");
}
