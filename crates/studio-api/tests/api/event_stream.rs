//! `GET /v1/fine_tuning/jobs/{id}/events?stream=true` over a real loopback socket, on Postgres
//! and on SQLite. Each case is written once against `Services`, and store calls drive the job
//! as a worker would.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;
use studio_core::{EventId, JobId};
use studio_store::{
    ArtifactStore, EventLevel, ModelCatalog, NewEvent, PgStore, Services, SqliteStore, Store,
    SystemClock,
};

use tokio_util::sync::CancellationToken;

use super::CHAT_LINE;

/// How long a case waits for the next stream message before it fails. The stream re-reads
/// every 2 seconds at the latest, so this leaves a wide margin.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(15);

const LEASE: Duration = Duration::from_secs(60);

/// More events than any case writes, so a stream that repeats events fails instead of hanging.
const MAX_EVENTS: usize = 100;

/// The API served on 127.0.0.1 with a port of its own.
struct Server {
    base: String,
    services: Services,
    client: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
    /// Starts the server's graceful shutdown.
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(store: Arc<dyn Store>, dir: tempfile::TempDir) -> Server {
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    std::fs::write(dir.path().join("models/tiny.gguf"), b"GGUF").unwrap();
    let services = Services {
        store,
        artifacts: Arc::new(ArtifactStore::new(dir.path().join("artifacts"))),
        models: ModelCatalog::new(dir.path().join("models")),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let app = studio_api::app_with_shutdown(services.clone(), shutdown.clone());
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .unwrap();
    });
    Server {
        base: format!("http://{address}"),
        services,
        // Without a proxy from the environment: the server is on this machine.
        client: reqwest::Client::builder().no_proxy().build().unwrap(),
        task,
        shutdown,
        _dir: dir,
    }
}

async fn pg_server(pool: PgPool) -> Server {
    serve(
        Arc::new(PgStore::new(pool, Arc::new(SystemClock))),
        tempfile::tempdir().unwrap(),
    )
    .await
}

async fn sqlite_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    studio_store::migrate(&studio_store::sqlite_url(dir.path()))
        .await
        .unwrap();
    let path = dir.path().join(studio_store::SQLITE_FILE_NAME);
    let store = SqliteStore::open(&path, Arc::new(SystemClock))
        .await
        .unwrap();
    serve(Arc::new(store), dir).await
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn store(&self) -> &Arc<dyn Store> {
        &self.services.store
    }

    /// Uploads a dataset and creates a job through the API, which writes its first event.
    async fn queued_job(&self) -> JobId {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "fine-tune")
            .part(
                "file",
                reqwest::multipart::Part::text(format!("{CHAT_LINE}\n{CHAT_LINE}\n"))
                    .file_name("train.jsonl"),
            );
        let file: Value = self
            .client
            .post(self.url("/v1/files"))
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let body = json!({"model": "tiny", "training_file": file["id"]});
        let job: Value = self
            .client
            .post(self.url("/v1/fine_tuning/jobs"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        JobId::parse(job["id"].as_str().expect("job created")).unwrap()
    }

    async fn insert_events(&self, job_id: &JobId, prefix: &str, count: usize) {
        for n in 0..count {
            let event = NewEvent::message(job_id, EventLevel::Info, format!("{prefix} {n}"));
            self.store().insert_event(&event).await.unwrap();
        }
    }

    /// Every event of the job as the list endpoint returns it, oldest first.
    async fn listed_events(&self, job_id: &JobId) -> Vec<Value> {
        let url = self.url(&format!("/v1/fine_tuning/jobs/{job_id}/events?limit=100"));
        let page: Value = self
            .client
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["has_more"], false);
        let mut events = page["data"].as_array().unwrap().clone();
        events.reverse();
        events
    }

    async fn open_stream(&self, job_id: &JobId, last_event_id: Option<&str>) -> reqwest::Response {
        let url = self.url(&format!("/v1/fine_tuning/jobs/{job_id}/events?stream=true"));
        let mut request = self.client.get(url);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        request.send().await.unwrap()
    }

    async fn stream(&self, job_id: &JobId, last_event_id: Option<&str>) -> SseReader {
        let response = self.open_stream(job_id, last_event_id).await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        SseReader {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }
}

/// One Server-Sent Events message.
#[derive(Debug, PartialEq)]
struct SseMessage {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

impl SseMessage {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|_| panic!("not JSON: {self:?}"))
    }
}

/// Splits a streaming response body into messages, skipping keep-alive comments.
struct SseReader {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    buffer: String,
}

impl SseReader {
    /// Returns the next message, or `None` when the server closed the stream.
    async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(message) = parse_block(&block) {
                    return Some(message);
                }
                continue;
            }
            let chunk = tokio::time::timeout(MESSAGE_TIMEOUT, self.body.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no stream message within {MESSAGE_TIMEOUT:?}; buffered: {:?}",
                        self.buffer
                    )
                });
            match chunk {
                Some(bytes) => self
                    .buffer
                    .push_str(std::str::from_utf8(&bytes.unwrap()).unwrap()),
                None => {
                    assert!(
                        self.buffer.trim().is_empty(),
                        "stream ended mid-message: {:?}",
                        self.buffer
                    );
                    return None;
                }
            }
        }
    }

    /// Reads `count` event messages and returns their JSON objects.
    async fn events(&mut self, count: usize) -> Vec<Value> {
        let mut events = Vec::new();
        for _ in 0..count {
            let message = self
                .next()
                .await
                .expect("the stream ended before the expected events");
            assert_eq!(message.event, None, "{message:?}");
            let event = message.json();
            assert_eq!(message.id.as_deref(), event["id"].as_str(), "{message:?}");
            events.push(event);
        }
        events
    }

    /// Reads event messages until the done message and checks that the stream then closes.
    async fn events_until_done(&mut self) -> Vec<Value> {
        let mut events = Vec::new();
        loop {
            assert!(
                events.len() <= MAX_EVENTS,
                "{} events and no done message; the stream repeats events",
                events.len()
            );
            let message = self
                .next()
                .await
                .expect("the stream ended without the done message");
            if message.event.as_deref() == Some("done") {
                assert_eq!(message.data, "[DONE]");
                assert_eq!(message.id, None);
                break;
            }
            assert_eq!(message.event, None, "{message:?}");
            events.push(message.json());
        }
        assert_eq!(
            self.next().await,
            None,
            "the stream continued after the done message"
        );
        events
    }
}

/// Parses one block of lines; a block of comments only gives `None`.
fn parse_block(block: &str) -> Option<SseMessage> {
    let mut message = SseMessage {
        id: None,
        event: None,
        data: String::new(),
    };
    let mut has_field = false;
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
        has_field = true;
        match field {
            "id" => message.id = Some(value),
            "event" => message.event = Some(value),
            "data" if message.data.is_empty() => message.data = value,
            "data" => message.data = format!("{}\n{value}", message.data),
            other => panic!("unexpected field {other:?} in {block:?}"),
        }
    }
    has_field.then_some(message)
}

fn messages(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|event| event["message"].as_str().unwrap())
        .collect()
}

fn ids(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|event| event["id"].as_str().unwrap())
        .collect()
}

/// Claims the job as worker `w1`, writes a last event and completes it.
async fn finish_job(server: &Server, job_id: &JobId) {
    let store = server.store();
    let claimed = store.claim_job("w1", LEASE).await.unwrap().unwrap();
    assert_eq!(&claimed.id, job_id);
    server.insert_events(job_id, "step", 2).await;
    store
        .complete_job(job_id, "w1", "tiny:ft-test", 64)
        .await
        .unwrap();
}

async fn stream_sends_existing_then_live_events(server: Server) {
    let id = server.queued_job().await;
    server.insert_events(&id, "before", 2).await;

    let mut stream = server.stream(&id, None).await;
    let existing = stream.events(3).await;
    server.insert_events(&id, "live", 2).await;
    let live = stream.events(2).await;

    let listed = server.listed_events(&id).await;
    assert_eq!(messages(&existing)[1..], ["before 0", "before 1"]);
    assert_eq!(messages(&live), ["live 0", "live 1"]);
    let streamed: Vec<Value> = existing.into_iter().chain(live).collect();
    assert_eq!(
        streamed, listed,
        "streamed objects differ from the list endpoint's"
    );
}

async fn stream_resumes_after_last_event_id(server: Server) {
    let id = server.queued_job().await;
    server.insert_events(&id, "event", 4).await;
    let mut first = server.stream(&id, None).await;
    let seen = first.events(3).await;
    drop(first);

    let last_seen = seen[2]["id"].as_str().unwrap();
    let mut resumed = server.stream(&id, Some(last_seen)).await;
    let rest = resumed.events(2).await;
    finish_job(&server, &id).await;
    let after_finish = resumed.events_until_done().await;

    let listed = server.listed_events(&id).await;
    let streamed: Vec<&str> = ids(&seen)
        .into_iter()
        .chain(ids(&rest))
        .chain(ids(&after_finish))
        .collect();
    assert_eq!(messages(&rest), ["event 2", "event 3"]);
    assert_eq!(messages(&after_finish), ["step 0", "step 1"]);
    assert_eq!(streamed, ids(&listed), "events were missed or repeated");
}

async fn stream_ends_with_done_after_job_finishes(server: Server) {
    let id = server.queued_job().await;
    let mut stream = server.stream(&id, None).await;
    let created = stream.events(1).await;

    finish_job(&server, &id).await;
    let rest = stream.events_until_done().await;
    let listed = server.listed_events(&id).await;
    let mut replay = server
        .stream(&id, Some(listed[1]["id"].as_str().unwrap()))
        .await;
    let replayed = replay.events_until_done().await;

    assert_eq!(messages(&rest), ["step 0", "step 1"]);
    assert_eq!(
        ids(&created)
            .into_iter()
            .chain(ids(&rest))
            .collect::<Vec<_>>(),
        ids(&listed)
    );
    assert_eq!(
        messages(&replayed),
        ["step 1"],
        "a finished job replays and closes"
    );
}

async fn stream_ends_on_server_shutdown(mut server: Server) {
    let id = server.queued_job().await;
    let mut stream = server.stream(&id, None).await;
    let created = stream.events(1).await;

    server.shutdown.cancel();
    let after_shutdown = stream.next().await;
    let stopped = tokio::time::timeout(MESSAGE_TIMEOUT, &mut server.task).await;

    assert_eq!(created.len(), 1);
    assert_eq!(after_shutdown, None, "the stream of a queued job ends at shutdown");
    assert!(
        stopped.is_ok(),
        "the server did not stop within {MESSAGE_TIMEOUT:?} of its shutdown"
    );
}

async fn stream_rejects_bad_last_event_id(server: Server) {
    let id = server.queued_job().await;
    let other = server.queued_job().await;
    let foreign = server.listed_events(&other).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let unknown = EventId::new().to_string();

    for bad in [unknown.as_str(), foreign.as_str(), "not-an-event"] {
        let response = server.open_stream(&id, Some(bad)).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();

        assert_eq!(status, 400, "Last-Event-ID {bad}: {body}");
        assert!(message.contains(bad), "{message}");
        assert!(message.contains(id.as_str()), "{message}");
        assert_eq!(body["error"]["code"], "invalid_last_event_id");
    }
}

async fn stream_rejects_bad_query(server: Server) {
    let id = server.queued_job().await;
    let base = format!("/v1/fine_tuning/jobs/{id}/events");

    for query in [
        "?stream=yes",
        "?stream=true&after=ftevent-x",
        "?stream=true&limit=5",
    ] {
        let response = server
            .client
            .get(server.url(&format!("{base}{query}")))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();

        assert_eq!(status, 400, "{query}: {body}");
    }
    let unknown_job = server
        .client
        .get(server.url(&format!(
            "/v1/fine_tuning/jobs/{}/events?stream=true",
            JobId::new()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_job.status(), 404);
}

/// Runs each case on Postgres (a `sqlx::test` database) and on an SQLite file.
macro_rules! stream_cases {
    ($($case:ident),+ $(,)?) => {
        mod postgres {
            use super::*;
            $(
                #[sqlx::test(migrations = "../../migrations")]
                async fn $case(pool: PgPool) {
                    super::$case(pg_server(pool).await).await;
                }
            )+
        }
        mod sqlite {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(sqlite_server().await).await;
                }
            )+
        }
    };
}

stream_cases!(
    stream_sends_existing_then_live_events,
    stream_resumes_after_last_event_id,
    stream_ends_with_done_after_job_finishes,
    stream_ends_on_server_shutdown,
    stream_rejects_bad_last_event_id,
    stream_rejects_bad_query,
);
