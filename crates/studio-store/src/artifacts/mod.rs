//! Artifacts (uploaded files, checkpoints, adapters) in a local folder or an S3-compatible
//! bucket through the `object_store` crate, addressed by keys such as `files/{file_id}` and
//! `jobs/{job_id}/final/adapter/adapter_model.safetensors`.
//!
//! A reader never sees a half-written artifact. In a local folder, `object_store` writes to a
//! staging file `NAME#N` beside the target and renames it into place. Listings leave staging
//! files out, and keys cannot name them. In a bucket, an upload becomes visible only when it
//! completes.
//!
//! NOTE: a process killed mid-write (SIGKILL, power loss) leaves its staging file `NAME#N`, or
//! its incomplete multipart upload in a bucket, behind, and nothing here removes it. A bucket
//! lifecycle rule that aborts incomplete multipart uploads cleans up the latter.

mod location;
mod writer;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{GetResultPayload, ObjectStore, ObjectStoreExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

pub use location::{
    ArtifactLocation, InvalidArtifactLocation, S3Credentials, S3Location, S3Options,
    ARTIFACTS_DIR_NAME, DEFAULT_S3_REGION,
};
pub use writer::ArtifactWriter;

use crate::StoreError;

/// The content of an artifact as it is read, in chunks.
pub type ArtifactStream = BoxStream<'static, std::io::Result<Bytes>>;

/// The default size of one part of a multipart upload, in bytes. An artifact up to this size is
/// written with one request.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;

/// The smallest part S3 accepts in a multipart upload, except for the last part.
pub const MIN_PART_SIZE: usize = 5 << 20;

/// The size of the chunks read from a local artifact or file.
const READ_CHUNK_SIZE: usize = 256 << 10;

/// How long [`ArtifactStore::check_access`] waits, retries included.
pub const ACCESS_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Artifacts in one [`ArtifactLocation`]. Clones share the connection.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// The location without credentials, for logs and error messages.
    location: String,
    /// The folder of a local store.
    local_root: Option<PathBuf>,
    part_size: usize,
}

impl ArtifactStore {
    /// Opens `location`, creating a local folder when missing. It sends no request to a bucket:
    /// call [`check_access`](Self::check_access) for that.
    pub fn connect(location: &ArtifactLocation) -> Result<ArtifactStore, StoreError> {
        Ok(ArtifactStore {
            store: location.build()?,
            location: location.to_string(),
            local_root: match location {
                ArtifactLocation::Local(root) => Some(root.clone()),
                ArtifactLocation::S3(_) => None,
            },
            part_size: DEFAULT_PART_SIZE,
        })
    }

    /// Opens the local folder `root`, creating it when missing.
    pub fn local(root: impl Into<PathBuf>) -> Result<ArtifactStore, StoreError> {
        Self::connect(&ArtifactLocation::Local(root.into()))
    }

    /// Opens the local folder `root`, creating it when missing.
    ///
    /// # Panics
    ///
    /// When the folder cannot be created or opened; [`local`](Self::local) returns that error
    /// instead.
    pub fn new(root: impl Into<PathBuf>) -> ArtifactStore {
        Self::local(root).unwrap_or_else(|err| panic!("{err:?}"))
    }

    /// Sets the part size of multipart uploads, in bytes.
    ///
    /// # Panics
    ///
    /// When `part_size` is below [`MIN_PART_SIZE`], which S3 rejects.
    pub fn with_part_size(mut self, part_size: usize) -> ArtifactStore {
        assert!(
            part_size >= MIN_PART_SIZE,
            "part size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes"
        );
        self.part_size = part_size;
        self
    }

    /// Returns the location, without credentials.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Returns the folder of a local store, where the artifact `KEY` is the file `ROOT/KEY`;
    /// `None` for a bucket.
    pub fn local_root(&self) -> Option<&FsPath> {
        self.local_root.as_deref()
    }

    /// Lists the top level of the store with one request, so a missing bucket, a wrong endpoint
    /// or rejected credentials fail here rather than at the first upload. Fails after
    /// [`ACCESS_CHECK_TIMEOUT`] without a response.
    pub async fn check_access(&self) -> Result<(), StoreError> {
        let unreachable = |source: object_store::Error| {
            storage_error(
                format!(
                    "the artifact store {} is not reachable; check the artifacts URL, the S3 endpoint and the credentials",
                    self.location
                ),
                source,
            )
        };
        match tokio::time::timeout(ACCESS_CHECK_TIMEOUT, self.store.list_with_delimiter(None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(unreachable(err)),
            Err(_) => Err(StoreError::other(
                format!(
                    "the artifact store {} did not answer within {} seconds; check the artifacts URL and the S3 endpoint",
                    self.location,
                    ACCESS_CHECK_TIMEOUT.as_secs()
                ),
                "timed out",
            )),
        }
    }

    /// Starts writing `key`. Nothing is visible under `key` until [`ArtifactWriter::commit`].
    pub async fn writer(&self, key: &str) -> Result<ArtifactWriter, StoreError> {
        let path = path_of(key)?;
        Ok(ArtifactWriter::new(
            self.store.clone(),
            path,
            key.to_owned(),
            self.part_size,
        ))
    }

    /// Copies a local file into `key`, streaming it; returns its size in bytes.
    pub async fn put_file(&self, key: &str, source: &FsPath) -> Result<u64, StoreError> {
        let mut writer = self.writer(key).await?;
        let mut file = tokio::fs::File::open(source)
            .await
            .map_err(|err| file_error("open", source, err))?;
        let mut chunk = vec![0u8; READ_CHUNK_SIZE];
        loop {
            let read = file
                .read(&mut chunk)
                .await
                .map_err(|err| file_error("read", source, err))?;
            if read == 0 {
                break;
            }
            writer.write(&chunk[..read]).await?;
        }
        writer.commit().await
    }

    pub async fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
        let mut writer = self.writer(key).await?;
        writer.write(bytes).await?;
        writer.commit().await
    }

    /// Opens `key` for a streaming read; returns its content and its size in bytes.
    pub async fn open(&self, key: &str) -> Result<(ArtifactStream, u64), StoreError> {
        let path = path_of(key)?;
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|err| self.error("read", key, err))?;
        let size = result.meta.size;
        let stream = match result.payload {
            // object_store 0.13 reads a local file in 8 KiB chunks, each a blocking-pool task.
            // Larger chunks through Tokio's file API cost fewer tasks per artifact.
            GetResultPayload::File(file, _) => {
                let file = tokio::fs::File::from_std(file).take(size);
                ReaderStream::with_capacity(file, READ_CHUNK_SIZE).boxed()
            }
            GetResultPayload::Stream(stream) => stream.map_err(std::io::Error::from).boxed(),
        };
        Ok((stream, size))
    }

    /// Returns the size of `key` in bytes.
    pub async fn size(&self, key: &str) -> Result<u64, StoreError> {
        let path = path_of(key)?;
        let meta = self
            .store
            .head(&path)
            .await
            .map_err(|err| self.error("look up", key, err))?;
        Ok(meta.size)
    }

    /// Reads a whole artifact into memory.
    pub async fn read(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = path_of(key)?;
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|err| self.error("read", key, err))?;
        let bytes = result
            .bytes()
            .await
            .map_err(|err| self.error("read", key, err))?;
        Ok(bytes.to_vec())
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.size(key).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Deletes `key`; deleting a missing artifact is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = path_of(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(self.error("delete", key, err)),
        }
    }

    /// Lists the artifacts under the folder `prefix` as (name relative to `prefix`, size in
    /// bytes), sorted by name; a missing folder lists nothing. Uploads in progress are left out.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix_path = path_of(prefix)?;
        let mut objects = self.store.list(Some(&prefix_path));
        let mut found = Vec::new();
        while let Some(meta) = objects
            .try_next()
            .await
            .map_err(|err| self.error("list", prefix, err))?
        {
            let Some(parts) = meta.location.prefix_match(&prefix_path) else {
                continue;
            };
            let name = parts
                .map(|part| part.as_ref().to_owned())
                .collect::<Vec<_>>()
                .join("/");
            // Keys cannot name these: the temporary files of an older version of this store
            // (`.NAME.ID.partial`) or objects that other programs put beside the artifacts.
            if name.is_empty() || !is_valid_key(&name) {
                continue;
            }
            found.push((name, meta.size));
        }
        found.sort();
        Ok(found)
    }

    /// Copies every file under the local folder `source` into `prefix/…`, keeping relative
    /// names; returns the number of files. Each file appears whole, but a reader listing the
    /// prefix meanwhile may see only some of them, so register the folder after this returns.
    pub async fn put_dir(&self, prefix: &str, source: &FsPath) -> Result<usize, StoreError> {
        let mut count = 0;
        let mut folders = vec![(source.to_path_buf(), prefix.to_owned())];
        while let Some((folder, key_prefix)) = folders.pop() {
            let mut entries = tokio::fs::read_dir(&folder)
                .await
                .map_err(|err| file_error("list", &folder, err))?;
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|err| file_error("list", &folder, err))?
            {
                let key = format!("{key_prefix}/{}", entry.file_name().to_string_lossy());
                let metadata = entry
                    .metadata()
                    .await
                    .map_err(|err| file_error("inspect", &entry.path(), err))?;
                if metadata.is_dir() {
                    folders.push((entry.path(), key));
                } else {
                    self.put_file(&key, &entry.path()).await?;
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// Copies every artifact under `prefix` into the local folder `target`, which is created,
    /// streaming each one to disk; returns the number of files.
    pub async fn get_dir(&self, prefix: &str, target: &FsPath) -> Result<usize, StoreError> {
        let files = self.list(prefix).await?;
        for (name, _) in &files {
            let destination = target.join(name);
            if let Some(parent) = destination.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|err| file_error("create", parent, err))?;
            }
            self.get_file(&format!("{prefix}/{name}"), &destination)
                .await?;
        }
        Ok(files.len())
    }

    /// Streams `key` into the local file `destination`; returns its size in bytes.
    pub async fn get_file(&self, key: &str, destination: &FsPath) -> Result<u64, StoreError> {
        let (mut stream, size) = self.open(key).await?;
        let mut file = tokio::fs::File::create(destination)
            .await
            .map_err(|err| file_error("create", destination, err))?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| {
                StoreError::other(
                    format!("failed to read artifact {key} from {}", self.location),
                    err.to_string(),
                )
            })?;
            file.write_all(&chunk)
                .await
                .map_err(|err| file_error("write", destination, err))?;
            written += chunk.len() as u64;
        }
        file.flush()
            .await
            .map_err(|err| file_error("write", destination, err))?;
        if written != size {
            return Err(StoreError::other(
                format!("artifact {key} in {} ended early", self.location),
                format!("read {written} of {size} bytes"),
            ));
        }
        Ok(written)
    }

    fn error(&self, action: &str, key: &str, err: object_store::Error) -> StoreError {
        match err {
            object_store::Error::NotFound { .. } => StoreError::not_found("artifact", key),
            other => storage_error(
                format!("failed to {action} artifact {key} in {}", self.location),
                other,
            ),
        }
    }
}

/// Returns whether `key` is '/'-separated names of ASCII letters, digits, '-', '_' and '.',
/// none empty or starting with '.', so it cannot leave the root (`..`, absolute keys) or name
/// a staging file (`NAME#N`).
pub(crate) fn is_valid_key(key: &str) -> bool {
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && !segment.starts_with('.')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    key.split('/').all(valid_segment)
}

/// Maps a key to its object path, rejecting keys that [`is_valid_key`] rejects.
fn path_of(key: &str) -> Result<Path, StoreError> {
    if !is_valid_key(key) {
        return Err(StoreError::Conflict(format!(
            "invalid artifact key {key:?}: use '/'-separated names of letters, digits, '-', '_' and '.' that do not start with '.'"
        )));
    }
    Path::parse(key).map_err(|err| StoreError::other(format!("invalid artifact key {key:?}"), err))
}

/// Wraps an `object_store` error as the source of a store error. The error becomes text, because
/// each of its nested sources repeats the text of the next, and printing the chain would repeat
/// it many times.
pub(crate) fn storage_error(context: String, err: object_store::Error) -> StoreError {
    StoreError::other(context, err.to_string())
}

fn file_error(action: &str, path: &FsPath, err: std::io::Error) -> StoreError {
    StoreError::other(
        format!("failed to {action} the local file {}", path.display()),
        err,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_root() {
        for key in [
            "../x",
            "files/../../x",
            "/etc/passwd",
            "files//x",
            "files/.hidden",
            "files/x#1",
            "files/",
            "",
        ] {
            assert!(path_of(key).is_err(), "key {key:?} must be rejected");
        }
    }

    #[test]
    fn artifact_keys_are_valid() {
        for key in [
            "files/file-0192",
            "jobs/ftjob-1/checkpoints/step-10/adapter_model.safetensors",
            "jobs/ftjob-1/final/results.csv",
        ] {
            assert_eq!(path_of(key).unwrap().as_ref(), key);
        }
    }
}
