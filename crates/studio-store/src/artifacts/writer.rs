//! A streaming write of one artifact: one request for a small artifact, a multipart upload for
//! a large one, visible only when committed.

use std::fmt;
use std::sync::Arc;

use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::task::JoinSet;

use super::storage_error;
use crate::StoreError;

/// The maximum number of parts of one writer that upload at once. With the buffer of the next
/// part, a writer keeps at most `(MAX_PARTS_IN_FLIGHT + 1) × part size` bytes in memory.
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// An artifact being written. The content goes out in parts of the store's part size: an
/// artifact no larger than one part is sent with one request at [`commit`](Self::commit), a
/// larger one as a multipart upload that becomes visible only when completed. Dropping the
/// writer without `commit`, or a failed `commit`, aborts the upload, so nothing appears under
/// its key.
pub struct ArtifactWriter {
    store: Arc<dyn ObjectStore>,
    path: Path,
    key: String,
    part_size: usize,
    /// The bytes of the next part, at most `part_size`.
    buffer: Vec<u8>,
    /// The multipart upload, started when the content outgrows one part.
    upload: Option<Upload>,
    bytes: u64,
}

struct Upload {
    multipart: Box<dyn MultipartUpload>,
    parts: JoinSet<object_store::Result<()>>,
}

impl ArtifactWriter {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        path: Path,
        key: String,
        part_size: usize,
    ) -> Self {
        ArtifactWriter {
            store,
            path,
            key,
            part_size,
            buffer: Vec::new(),
            upload: None,
            bytes: 0,
        }
    }

    /// Appends `chunk`. Waits while [`MAX_PARTS_IN_FLIGHT`] parts are uploading; a failed part
    /// aborts the upload and returns its error.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        let mut rest = chunk;
        while !rest.is_empty() {
            // A full buffer is sent only when more content follows, so an artifact of exactly
            // one part still goes out as a single request.
            if self.buffer.len() == self.part_size {
                if let Err(err) = self.send_part().await {
                    self.abort_upload().await;
                    return Err(err);
                }
            }
            let take = (self.part_size - self.buffer.len()).min(rest.len());
            self.buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        self.bytes += chunk.len() as u64;
        Ok(())
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Makes the artifact visible under its key, whole; returns its size in bytes.
    pub async fn commit(mut self) -> Result<u64, StoreError> {
        let result = if self.upload.is_some() {
            self.complete_upload().await
        } else {
            let payload = PutPayload::from(std::mem::take(&mut self.buffer));
            self.store
                .put(&self.path, payload)
                .await
                .map(drop)
                .map_err(|err| self.error("write", err))
        };
        if result.is_err() {
            self.abort_upload().await;
        }
        result.map(|()| self.bytes)
    }

    /// Discards the content and waits until an upload in progress is aborted.
    pub async fn abort(mut self) {
        self.abort_upload().await;
    }

    async fn send_part(&mut self) -> Result<(), StoreError> {
        if self.upload.is_none() {
            let multipart = self
                .store
                .put_multipart(&self.path)
                .await
                .map_err(|err| self.error("start the multipart upload of", err))?;
            self.upload = Some(Upload {
                multipart,
                parts: JoinSet::new(),
            });
        }
        while self
            .upload
            .as_ref()
            .is_some_and(|upload| upload.parts.len() >= MAX_PARTS_IN_FLIGHT)
        {
            self.join_next_part().await?;
        }

        let part = std::mem::replace(&mut self.buffer, Vec::with_capacity(self.part_size));
        let upload = self.upload.as_mut().expect("the upload started above");
        upload
            .parts
            .spawn(upload.multipart.put_part(PutPayload::from(part)));
        Ok(())
    }

    /// Waits for one uploading part; returns `Ok(false)` when none is left.
    async fn join_next_part(&mut self) -> Result<bool, StoreError> {
        let Some(upload) = self.upload.as_mut() else {
            return Ok(false);
        };
        match upload.parts.join_next().await {
            None => Ok(false),
            Some(Ok(Ok(()))) => Ok(true),
            Some(Ok(Err(err))) => Err(self.error("upload a part of", err)),
            Some(Err(err)) => Err(StoreError::other(
                format!(
                    "the upload of a part of artifact {} stopped unexpectedly",
                    self.key
                ),
                err,
            )),
        }
    }

    async fn complete_upload(&mut self) -> Result<(), StoreError> {
        if !self.buffer.is_empty() {
            let part = PutPayload::from(std::mem::take(&mut self.buffer));
            let upload = self
                .upload
                .as_mut()
                .expect("complete_upload runs during an upload");
            upload.parts.spawn(upload.multipart.put_part(part));
        }
        while self.join_next_part().await? {}

        let mut upload = self
            .upload
            .take()
            .expect("complete_upload runs during an upload");
        match upload.multipart.complete().await {
            Ok(_) => Ok(()),
            Err(err) => {
                let error = self.error("complete the multipart upload of", err);
                self.upload = Some(upload);
                Err(error)
            }
        }
    }

    async fn abort_upload(&mut self) {
        if let Some(upload) = self.upload.take() {
            abort(upload, &self.key).await;
        }
    }

    fn error(&self, action: &str, err: object_store::Error) -> StoreError {
        storage_error(format!("failed to {action} artifact {}", self.key), err)
    }
}

/// Stops the parts still uploading and aborts the multipart upload, so the store discards the
/// parts it received. A failure is logged, since the caller has already failed or given up.
async fn abort(mut upload: Upload, key: &str) {
    upload.parts.shutdown().await;
    match upload.multipart.abort().await {
        Ok(()) => tracing::debug!(artifact = key, "multipart upload aborted"),
        Err(err) => {
            // NOTE: the parts of an upload whose abort failed stay in an S3 bucket, invisible
            // but billed, until a lifecycle rule removes incomplete multipart uploads.
            tracing::warn!(artifact = key, error = %err, "failed to abort a multipart upload")
        }
    }
}

impl Drop for ArtifactWriter {
    /// Aborts an upload in progress on the current Tokio runtime, in the background.
    fn drop(&mut self) {
        let Some(upload) = self.upload.take() else {
            return;
        };
        let key = std::mem::take(&mut self.key);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { abort(upload, &key).await });
            }
            Err(_) => tracing::warn!(
                artifact = key,
                "an uncommitted multipart upload was dropped outside a Tokio runtime and stays incomplete"
            ),
        }
    }
}

impl fmt::Debug for ArtifactWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactWriter")
            .field("key", &self.key)
            .field("bytes", &self.bytes)
            .field("multipart", &self.upload.is_some())
            .finish()
    }
}
