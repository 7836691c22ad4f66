//! Artifacts (uploaded files, adapters) in a local folder, addressed by keys such as
//! `files/{file_id}` and `jobs/{job_id}/final/adapter/adapter_model.safetensors`.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use crate::StoreError;

/// A folder of artifacts. Every write goes to a temporary file in the target folder that is
/// renamed into place when whole, so a reader never sees a half-written artifact.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    root: PathBuf,
}

impl ArtifactStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Starts writing `key`. Nothing is visible under `key` until [`ArtifactWriter::commit`].
    pub async fn writer(&self, key: &str) -> Result<ArtifactWriter, StoreError> {
        let final_path = self.path_of(key)?;
        let folder = final_path.parent().expect("a key has at least one segment");
        tokio::fs::create_dir_all(folder).await?;

        let name = final_path
            .file_name()
            .expect("a key ends in a name")
            .to_string_lossy();
        let temp_path = folder.join(format!(".{name}.{}.partial", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::File::create(&temp_path).await?;
        Ok(ArtifactWriter {
            file: Some(file),
            temp_path,
            final_path,
            bytes: 0,
        })
    }

    /// Copies a local file into `key`; returns its size in bytes.
    pub async fn put_file(&self, key: &str, source: &Path) -> Result<u64, StoreError> {
        let mut writer = self.writer(key).await?;
        let mut reader = tokio::fs::File::open(source).await?;
        let file = writer
            .file
            .as_mut()
            .expect("an uncommitted writer has its file");
        let bytes = tokio::io::copy(&mut reader, file).await?;
        writer.bytes = bytes;
        writer.commit().await
    }

    pub async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
        let mut writer = self.writer(key).await?;
        writer.write(bytes).await?;
        writer.commit().await
    }

    /// Opens `key` for a streaming read; returns the file and its size in bytes.
    pub async fn open(&self, key: &str) -> Result<(tokio::fs::File, u64), StoreError> {
        let path = self.path_of(key)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::not_found("artifact", key));
            }
            Err(err) => return Err(err.into()),
        };
        let len = file.metadata().await?.len();
        Ok((file, len))
    }

    /// Reads a whole artifact into memory.
    pub async fn read(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::not_found("artifact", key))
            }
            Err(err) => Err(err.into()),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(tokio::fs::try_exists(self.path_of(key)?).await?)
    }

    /// Deletes `key`; deleting a missing artifact is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path_of(key)?).await {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }

    /// Lists the artifacts under the folder `prefix` as (name relative to `prefix`, size in
    /// bytes), sorted by name; a missing folder lists nothing. Partial writes are left out.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let root = self.path_of(prefix)?;
        let mut found = Vec::new();
        let mut folders = vec![(root, String::new())];
        while let Some((folder, relative)) = folders.pop() {
            let mut entries = match tokio::fs::read_dir(&folder).await {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err.into()),
            };
            while let Some(entry) = entries.next_entry().await? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let name = if relative.is_empty() {
                    name
                } else {
                    format!("{relative}/{name}")
                };
                let metadata = entry.metadata().await?;
                if metadata.is_dir() {
                    folders.push((entry.path(), name));
                } else {
                    found.push((name, metadata.len()));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Copies every file under the local folder `source` into `prefix/…`, keeping relative
    /// names; returns the number of files. Each file appears whole, but a reader listing the
    /// prefix meanwhile may see only some of them, so register the folder after this returns.
    pub async fn put_dir(&self, prefix: &str, source: &Path) -> Result<usize, StoreError> {
        let mut count = 0;
        let mut folders = vec![(source.to_path_buf(), prefix.to_owned())];
        while let Some((folder, key_prefix)) = folders.pop() {
            let mut entries = tokio::fs::read_dir(&folder).await?;
            while let Some(entry) = entries.next_entry().await? {
                let key = format!("{key_prefix}/{}", entry.file_name().to_string_lossy());
                if entry.metadata().await?.is_dir() {
                    folders.push((entry.path(), key));
                } else {
                    self.put_file(&key, &entry.path()).await?;
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// Copies every artifact under `prefix` into the local folder `target`, which is created;
    /// returns the number of files.
    pub async fn get_dir(&self, prefix: &str, target: &Path) -> Result<usize, StoreError> {
        let files = self.list(prefix).await?;
        for (name, _) in &files {
            let destination = target.join(name);
            if let Some(parent) = destination.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::copy(self.path_of(&format!("{prefix}/{name}"))?, &destination).await?;
        }
        Ok(files.len())
    }

    /// Maps a key to its path, rejecting keys that could leave the root (`..`, absolute paths).
    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        let valid_segment = |segment: &str| {
            !segment.is_empty()
                && !segment.starts_with('.')
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if key.split('/').all(valid_segment) {
            Ok(self.root.join(key))
        } else {
            Err(StoreError::Conflict(format!(
                "invalid artifact key {key:?}: use '/'-separated names of letters, digits, '-', '_' and '.'"
            )))
        }
    }
}

/// An artifact being written. Dropping it without [`commit`](Self::commit) deletes the
/// temporary file, so an aborted upload leaves nothing behind.
#[derive(Debug)]
pub struct ArtifactWriter {
    file: Option<tokio::fs::File>,
    temp_path: PathBuf,
    final_path: PathBuf,
    bytes: u64,
}

impl ArtifactWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let file = self
            .file
            .as_mut()
            .expect("an uncommitted writer has its file");
        file.write_all(chunk).await?;
        self.bytes += chunk.len() as u64;
        Ok(())
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Flushes the content to disk and renames it into place; returns its size in bytes.
    pub async fn commit(mut self) -> Result<u64, StoreError> {
        let mut file = self.file.take().expect("commit runs once");
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&self.temp_path, &self.final_path).await?;
        Ok(self.bytes)
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.temp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn committed_write_is_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path());
        let mut writer = store.writer("files/file-1").await.unwrap();
        writer.write(b"hello ").await.unwrap();
        writer.write(b"world").await.unwrap();
        assert_eq!(writer.commit().await.unwrap(), 11);
        assert_eq!(store.read("files/file-1").await.unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn uncommitted_write_is_invisible_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path());
        let mut writer = store.writer("files/file-2").await.unwrap();
        writer.write(b"half").await.unwrap();
        assert!(!store.exists("files/file-2").await.unwrap());
        drop(writer);
        let leftovers = std::fs::read_dir(dir.path().join("files")).unwrap().count();
        assert_eq!(leftovers, 0);
    }

    #[tokio::test]
    async fn missing_artifact_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path());
        assert!(matches!(
            store.open("files/nope").await,
            Err(StoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn folder_round_trips_through_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().join("artifacts"));
        let source = dir.path().join("source");
        std::fs::create_dir_all(source.join("nested")).unwrap();
        std::fs::write(source.join("config.json"), b"{}").unwrap();
        std::fs::write(source.join("nested/weights.bin"), b"12345").unwrap();

        let uploaded = store.put_dir("jobs/j/final/model", &source).await.unwrap();
        let listed = store.list("jobs/j/final/model").await.unwrap();
        let target = dir.path().join("target");
        let downloaded = store.get_dir("jobs/j/final/model", &target).await.unwrap();

        assert_eq!(uploaded, 2);
        assert_eq!(
            listed,
            [
                ("config.json".to_owned(), 2),
                ("nested/weights.bin".to_owned(), 5)
            ]
        );
        assert_eq!(downloaded, 2);
        assert_eq!(
            std::fs::read(target.join("nested/weights.bin")).unwrap(),
            b"12345"
        );
    }

    #[tokio::test]
    async fn missing_prefix_lists_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path());
        assert_eq!(store.list("jobs/none/final/merged").await.unwrap(), []);
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let store = ArtifactStore::new("/nonexistent-root");
        for key in [
            "../x",
            "files/../../x",
            "/etc/passwd",
            "files//x",
            "files/.hidden",
        ] {
            assert!(
                store.writer(key).await.is_err(),
                "key {key:?} must be rejected"
            );
        }
    }
}
