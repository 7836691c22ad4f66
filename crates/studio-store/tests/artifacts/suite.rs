//! The cases of the `ArtifactStore` contract, written once against a `Backend` that also shows
//! what the storage underneath holds. Each backend module turns every case into a test with
//! `artifact_cases!`.

use std::time::Duration;

use futures::TryStreamExt;
use studio_store::{ArtifactStore, StoreError, MIN_PART_SIZE};

/// The part size of every store under test, S3's minimum, so a 12 MiB artifact takes 3 parts.
pub const PART_SIZE: usize = MIN_PART_SIZE;

/// A store and a view of its storage that bypasses it.
pub trait Backend {
    fn store(&self) -> &ArtifactStore;

    /// Returns the name under which the storage keeps the artifact `key`.
    fn stored_name(&self, key: &str) -> String;

    /// Lists every name in the storage with its size, sorted, including what `list` hides.
    async fn stored(&self) -> Vec<(String, u64)>;

    /// Counts uploads that were started and neither completed nor aborted.
    async fn pending_uploads(&self) -> usize;
}

/// Generates one test per case in the calling module, which defines `open_backend()`.
macro_rules! artifact_cases {
    () => {
        artifact_cases!(
            committed_write_is_readable,
            empty_artifact_round_trips,
            multipart_upload_reads_back_whole,
            dropped_writer_leaves_nothing,
            aborted_writer_leaves_nothing,
            list_returns_relative_names_and_sizes,
            delete_removes_artifact,
            folder_round_trips_through_prefix,
            missing_artifact_is_not_found,
            invalid_keys_are_rejected,
            keys_are_stored_under_root,
        );
    };
    ($($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = open_backend().await;
                crate::suite::$case(&backend).await;
            }
        )+
    };
}

/// Returns `len` bytes that differ from one part to the next and within a part, so a part that
/// is lost, repeated or reordered changes the content.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i / PART_SIZE) as u8)
        .collect()
}

async fn read_stream(store: &ArtifactStore, key: &str) -> (Vec<u8>, u64) {
    let (stream, size) = store.open(key).await.unwrap();
    let chunks: Vec<_> = stream.try_collect().await.unwrap();
    (chunks.concat(), size)
}

async fn wait_for_no_pending_uploads(backend: &impl Backend) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pending = backend.pending_uploads().await;
        if pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pending} uploads are still pending 10 s after the writer was dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn committed_write_is_readable(backend: &impl Backend) {
    let store = backend.store();
    let mut writer = store.writer("files/file-1").await.unwrap();
    writer.write(b"hello ").await.unwrap();
    writer.write(b"world").await.unwrap();

    assert!(!store.exists("files/file-1").await.unwrap());
    assert_eq!(writer.bytes_written(), 11);
    assert_eq!(writer.commit().await.unwrap(), 11);
    assert!(store.exists("files/file-1").await.unwrap());
    assert_eq!(store.size("files/file-1").await.unwrap(), 11);
    assert_eq!(store.read("files/file-1").await.unwrap(), b"hello world");
    assert_eq!(
        read_stream(store, "files/file-1").await,
        (b"hello world".to_vec(), 11)
    );
}

pub async fn empty_artifact_round_trips(backend: &impl Backend) {
    let store = backend.store();

    assert_eq!(store.put_bytes("files/empty", b"").await.unwrap(), 0);

    assert_eq!(store.read("files/empty").await.unwrap(), b"");
    assert_eq!(read_stream(store, "files/empty").await, (Vec::new(), 0));
    assert_eq!(
        store.list("files").await.unwrap(),
        [("empty".to_owned(), 0)]
    );
}

pub async fn multipart_upload_reads_back_whole(backend: &impl Backend) {
    let store = backend.store();
    let content = pattern(12 << 20);
    let mut writer = store
        .writer("jobs/j/final/model/model.safetensors")
        .await
        .unwrap();
    // Chunks that do not divide the part size, so parts are cut inside a chunk.
    for chunk in content.chunks((1 << 20) + 7) {
        writer.write(chunk).await.unwrap();
    }

    assert_eq!(
        backend.pending_uploads().await,
        1,
        "no multipart upload was started"
    );
    assert!(
        store.list("jobs/j").await.unwrap().is_empty(),
        "an upload in progress is listed"
    );
    assert!(!store
        .exists("jobs/j/final/model/model.safetensors")
        .await
        .unwrap());
    let committed = writer.commit().await.unwrap();

    assert_eq!(committed, content.len() as u64);
    assert_eq!(backend.pending_uploads().await, 0);
    assert_eq!(
        store.list("jobs/j/final/model").await.unwrap(),
        [("model.safetensors".to_owned(), content.len() as u64)]
    );
    let (streamed, size) = read_stream(store, "jobs/j/final/model/model.safetensors").await;
    assert_eq!(size, content.len() as u64);
    assert!(
        streamed == content,
        "the streamed artifact differs from what was written"
    );
    let read = store
        .read("jobs/j/final/model/model.safetensors")
        .await
        .unwrap();
    assert!(
        read == content,
        "the artifact read whole differs from what was written"
    );
}

pub async fn dropped_writer_leaves_nothing(backend: &impl Backend) {
    let store = backend.store();
    let mut small = store.writer("files/small").await.unwrap();
    small.write(b"half").await.unwrap();
    let mut large = store.writer("files/large").await.unwrap();
    large.write(&pattern(2 * PART_SIZE + 1)).await.unwrap();
    assert_eq!(
        backend.pending_uploads().await,
        1,
        "no multipart upload was started"
    );

    drop(small);
    drop(large);

    wait_for_no_pending_uploads(backend).await;
    assert!(store.list("files").await.unwrap().is_empty());
    assert!(!store.exists("files/large").await.unwrap());
    assert!(
        backend.stored().await.is_empty(),
        "{:?}",
        backend.stored().await
    );
}

pub async fn aborted_writer_leaves_nothing(backend: &impl Backend) {
    let store = backend.store();
    let mut writer = store.writer("files/large").await.unwrap();
    writer.write(&pattern(PART_SIZE + 1)).await.unwrap();
    assert_eq!(
        backend.pending_uploads().await,
        1,
        "no multipart upload was started"
    );

    writer.abort().await;

    assert_eq!(backend.pending_uploads().await, 0);
    assert!(
        backend.stored().await.is_empty(),
        "{:?}",
        backend.stored().await
    );
}

pub async fn list_returns_relative_names_and_sizes(backend: &impl Backend) {
    let store = backend.store();
    store
        .put_bytes("jobs/j/final/model/model.safetensors", b"12345")
        .await
        .unwrap();
    store
        .put_bytes("jobs/j/final/model/config.json", b"{}")
        .await
        .unwrap();
    store
        .put_bytes("jobs/j/final/model/tokenizer/vocab.json", b"[1]")
        .await
        .unwrap();
    store
        .put_bytes("jobs/j/final/model2/other.json", b"{}")
        .await
        .unwrap();

    assert_eq!(
        store.list("jobs/j/final/model").await.unwrap(),
        [
            ("config.json".to_owned(), 2),
            ("model.safetensors".to_owned(), 5),
            ("tokenizer/vocab.json".to_owned(), 3),
        ]
    );
    assert!(
        store.list("jobs/j/final/mod").await.unwrap().is_empty(),
        "a prefix matches inside a name"
    );
    assert!(store
        .list("jobs/none/final/merged")
        .await
        .unwrap()
        .is_empty());
}

pub async fn delete_removes_artifact(backend: &impl Backend) {
    let store = backend.store();
    store.put_bytes("files/file-1", b"data").await.unwrap();

    store.delete("files/file-1").await.unwrap();
    store.delete("files/file-1").await.unwrap();

    assert!(!store.exists("files/file-1").await.unwrap());
    assert!(
        backend.stored().await.is_empty(),
        "{:?}",
        backend.stored().await
    );
}

pub async fn folder_round_trips_through_prefix(backend: &impl Backend) {
    let store = backend.store();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let large = pattern(PART_SIZE + 3);
    std::fs::create_dir_all(source.join("nested")).unwrap();
    std::fs::write(source.join("config.json"), b"{}").unwrap();
    std::fs::write(source.join("nested/weights.bin"), &large).unwrap();

    let uploaded = store
        .put_dir("jobs/j/checkpoints/step-2", &source)
        .await
        .unwrap();
    let listed = store.list("jobs/j/checkpoints/step-2").await.unwrap();
    let target = dir.path().join("target");
    let downloaded = store
        .get_dir("jobs/j/checkpoints/step-2", &target)
        .await
        .unwrap();

    assert_eq!(uploaded, 2);
    assert_eq!(
        listed,
        [
            ("config.json".to_owned(), 2),
            ("nested/weights.bin".to_owned(), large.len() as u64),
        ]
    );
    assert_eq!(downloaded, 2);
    assert_eq!(std::fs::read(target.join("config.json")).unwrap(), b"{}");
    assert!(std::fs::read(target.join("nested/weights.bin")).unwrap() == large);
}

pub async fn missing_artifact_is_not_found(backend: &impl Backend) {
    let store = backend.store();

    assert!(matches!(
        store.open("files/nope").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.read("files/nope").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.size("files/nope").await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(!store.exists("files/nope").await.unwrap());
}

pub async fn invalid_keys_are_rejected(backend: &impl Backend) {
    let store = backend.store();
    for key in [
        "../x",
        "files/../../x",
        "/etc/passwd",
        "files//x",
        "files/.hidden",
        "files/x#1",
    ] {
        assert!(
            store.writer(key).await.is_err(),
            "writer({key:?}) must fail"
        );
        assert!(
            store.put_bytes(key, b"x").await.is_err(),
            "put_bytes({key:?}) must fail"
        );
        assert!(store.open(key).await.is_err(), "open({key:?}) must fail");
        assert!(store.list(key).await.is_err(), "list({key:?}) must fail");
        assert!(
            store.delete(key).await.is_err(),
            "delete({key:?}) must fail"
        );
    }

    assert!(
        backend.stored().await.is_empty(),
        "{:?}",
        backend.stored().await
    );
}

pub async fn keys_are_stored_under_root(backend: &impl Backend) {
    let store = backend.store();
    store.put_bytes("files/file-1", b"abc").await.unwrap();
    store
        .put_bytes("jobs/j/final/results.csv", b"step\n")
        .await
        .unwrap();

    let mut expected = vec![
        (backend.stored_name("files/file-1"), 3),
        (backend.stored_name("jobs/j/final/results.csv"), 5),
    ];
    expected.sort();
    assert_eq!(backend.stored().await, expected);
}
