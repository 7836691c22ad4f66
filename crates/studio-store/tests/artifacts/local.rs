//! The cases on a local folder, each in its own temporary folder.

use std::path::{Path, PathBuf};

use studio_store::{ArtifactLocation, ArtifactStore};
use tempfile::TempDir;

use crate::suite::{Backend, PART_SIZE};

pub struct LocalBackend {
    store: ArtifactStore,
    root: PathBuf,
    _folder: TempDir,
}

async fn open_backend() -> LocalBackend {
    let folder = tempfile::tempdir().unwrap();
    let root = folder.path().join("data/artifacts");
    let store = ArtifactStore::connect(&ArtifactLocation::Local(root.clone()))
        .unwrap()
        .with_part_size(PART_SIZE);
    LocalBackend {
        store,
        root,
        _folder: folder,
    }
}

impl Backend for LocalBackend {
    fn store(&self) -> &ArtifactStore {
        &self.store
    }

    fn stored_name(&self, key: &str) -> String {
        key.to_owned()
    }

    async fn stored(&self) -> Vec<(String, u64)> {
        let mut files = Vec::new();
        walk(&self.root, &self.root, &mut files);
        files.sort();
        files
    }

    /// Counts object_store's staging files, `NAME#N`.
    async fn pending_uploads(&self) -> usize {
        self.stored()
            .await
            .iter()
            .filter(|(name, _)| name.contains('#'))
            .count()
    }
}

/// Collects every file under `folder` as (path relative to `root`, size).
fn walk(root: &Path, folder: &Path, files: &mut Vec<(String, u64)>) {
    for entry in std::fs::read_dir(folder).unwrap() {
        let entry = entry.unwrap();
        let metadata = entry.metadata().unwrap();
        if metadata.is_dir() {
            walk(root, &entry.path(), files);
        } else {
            let name = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            files.push((name, metadata.len()));
        }
    }
}

artifact_cases!();

#[tokio::test]
async fn connect_creates_missing_folder() {
    let backend = open_backend().await;

    assert!(backend.root.is_dir());
    backend.store().check_access().await.unwrap();
}

#[tokio::test]
async fn staging_and_partial_files_are_not_listed() {
    let backend = open_backend().await;
    let store = backend.store();
    store
        .put_bytes("jobs/j/final/adapter/adapter_config.json", b"{}")
        .await
        .unwrap();
    let folder = backend.root.join("jobs/j/final/adapter");
    // A staging file of object_store and a temporary file of the store's older versions.
    std::fs::write(folder.join("adapter_model.safetensors#1"), b"half").unwrap();
    std::fs::write(
        folder.join(".adapter_model.safetensors.0123.partial"),
        b"half",
    )
    .unwrap();

    let listed = store.list("jobs/j/final/adapter").await.unwrap();

    assert_eq!(listed, [("adapter_config.json".to_owned(), 2)]);
    assert!(!store
        .exists("jobs/j/final/adapter/adapter_model.safetensors")
        .await
        .unwrap());
}

#[tokio::test]
async fn multipart_upload_stages_beside_target() {
    let backend = open_backend().await;
    let store = backend.store();
    let mut writer = store.writer("files/file-1").await.unwrap();
    writer
        .write(&crate::suite::pattern(PART_SIZE + 1))
        .await
        .unwrap();

    let stored = backend.stored().await;

    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].0.starts_with("files/file-1#"), "{stored:?}");
    assert!(store.list("files").await.unwrap().is_empty());
    writer.commit().await.unwrap();
    assert_eq!(
        backend.stored().await,
        [("files/file-1".to_owned(), PART_SIZE as u64 + 1)]
    );
}
