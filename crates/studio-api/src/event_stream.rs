//! `GET /v1/fine_tuning/jobs/{id}/events?stream=true`: the job's events as Server-Sent Events,
//! oldest first, then live until the job finishes.
//!
//! Each event is one message with `id: ftevent-…` and the list endpoint's JSON object as `data`.
//! A client that reconnects with `Last-Event-ID` gets exactly the events after that one. When
//! the job is in a terminal state and every event is sent, the stream sends `event: done` with
//! `data: [DONE]` and closes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::Stream;
use serde_json::json;
use studio_core::{EventId, JobId};
use studio_store::{EventRecord, EventSubscription, JobRecord, Services, Store, StoreError};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::ApiError;
use crate::events::event_object;
use crate::jobs::find_job;

/// The maximum number of events one store read returns.
const BATCH: u32 = 100;

/// Time between re-reads that do not wait for a notification. They are how the stream learns
/// that the job finished, because a status change sends no notification.
// NOTE: on SQLite a worker in another process (`smart-studio worker` beside `serve`) cannot
// wake this process, so its events arrive with up to this delay; Postgres notifies at once.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Time between keep-alive comments on an idle stream, so proxies keep the connection open.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// How long after a job finished the stream still waits for events. Some events are written
/// just after the status change: the cancel of a queued job, a rescue from a dead worker.
const TRAILING_EVENT_GRACE: Duration = Duration::from_secs(1);

const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// The token cancelled when the server shuts down. Every open stream then ends without a
/// `done` message, and its client resumes by reconnecting with `Last-Event-ID`.
#[derive(Clone, Debug)]
pub struct StreamShutdown(pub CancellationToken);

/// Serves a stream request: checks the job and `Last-Event-ID` (404 and 400 come as usual
/// error responses), then returns the event stream.
pub async fn respond(
    services: Services,
    job_id: &str,
    headers: &HeaderMap,
    shutdown: StreamShutdown,
) -> Result<Response, ApiError> {
    let job = find_job(&services, job_id).await?;
    let after = last_event_id(headers, &job.id)?;
    let store = services.store;

    // Subscribe before the first read, so that an event inserted in between still wakes the
    // stream. The job's status is read before the events too: a terminal status seen here
    // means every event the job's worker wrote is in the first reads.
    let subscription = store.subscribe_events().await?;
    let first = match store
        .list_events_since(&job.id, after.as_ref(), BATCH)
        .await
    {
        Err(StoreError::NotFound { .. }) => {
            let after = after.as_ref().map(EventId::as_str).unwrap_or_default();
            return Err(unknown_last_event_id(after, &job.id));
        }
        result => result?,
    };
    tracing::debug!(job_id = %job.id, last_event_id = ?after, "event stream opened");

    let feed = EventFeed::new(store, &job, after, first, subscription, shutdown.0);
    let response =
        Sse::new(feed.into_stream()).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL));
    // `X-Accel-Buffering: no` stops nginx from holding the stream back in its buffer.
    Ok(([("x-accel-buffering", "no")], response).into_response())
}

/// Parses the `Last-Event-ID` header; an empty one counts as absent, as `EventSource` sends
/// none before its first event.
fn last_event_id(headers: &HeaderMap, job_id: &JobId) -> Result<Option<EventId>, ApiError> {
    let Some(value) = headers.get(LAST_EVENT_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| unknown_last_event_id(&String::from_utf8_lossy(value.as_bytes()), job_id))?;
    if text.is_empty() {
        return Ok(None);
    }
    EventId::parse(text)
        .map(Some)
        .map_err(|_| unknown_last_event_id(text, job_id))
}

fn unknown_last_event_id(value: &str, job_id: &JobId) -> ApiError {
    ApiError::invalid(
        format!(
            "Last-Event-ID {value:?} is not an event of fine-tuning job {job_id}; send the id of \
             the last event this stream sent, or no Last-Event-ID to receive every event"
        ),
        None,
        "invalid_last_event_id",
    )
}

/// The state of one client's stream.
struct EventFeed {
    store: Arc<dyn Store>,
    job_id: JobId,
    /// The id of the last event sent; the next read continues after it.
    last_sent: Option<EventId>,
    /// Events read but not sent yet, oldest first.
    pending: VecDeque<EventRecord>,
    /// Whether the next step reads the store before it waits.
    read_due: bool,
    /// `None` once the store stopped sending notifications; the poll timer still runs.
    subscription: Option<EventSubscription>,
    poll: Interval,
    /// Set once the job was seen in a terminal state: the first read after this instant that
    /// finds no new event ends the stream.
    done_at: Option<Instant>,
    finished: bool,
    shutdown: CancellationToken,
}

impl EventFeed {
    fn new(
        store: Arc<dyn Store>,
        job: &JobRecord,
        after: Option<EventId>,
        first: Vec<EventRecord>,
        subscription: EventSubscription,
        shutdown: CancellationToken,
    ) -> Self {
        let mut poll = tokio::time::interval_at(Instant::now() + POLL_INTERVAL, POLL_INTERVAL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            store,
            job_id: job.id.clone(),
            last_sent: after,
            read_due: first.len() == BATCH as usize,
            pending: first.into(),
            subscription: Some(subscription),
            poll,
            done_at: job.status.is_terminal().then(|| done_deadline(job)),
            finished: false,
            shutdown,
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> {
        let span = tracing::Span::current();
        futures::stream::unfold(self, move |mut feed| {
            async move {
                let event = feed.next().await?;
                Some((Ok(event), feed))
            }
            .instrument(span.clone())
        })
    }

    /// Returns the next message, waiting for one when every read event is sent, or `None`
    /// after the last message.
    async fn next(&mut self) -> Option<Event> {
        loop {
            // Unsent events are not lost: the client's reconnect resumes after the last one sent.
            if self.shutdown.is_cancelled() {
                tracing::debug!(job_id = %self.job_id, "event stream closed for the server shutdown");
                return None;
            }
            if let Some(event) = self.pending.pop_front() {
                let message = Event::default()
                    .id(event.id.as_str())
                    .data(event_object(&event).to_string());
                self.last_sent = Some(event.id);
                return Some(message);
            }
            if self.finished {
                tracing::debug!(job_id = %self.job_id, "event stream closed");
                return None;
            }
            if self.read_due {
                if let Err(err) = self.read().await {
                    return Some(self.fail(err));
                }
                if !self.pending.is_empty() {
                    continue;
                }
                if self.done_at.is_some_and(|at| Instant::now() >= at) {
                    self.finished = true;
                    return Some(Event::default().event("done").data("[DONE]"));
                }
            }
            if let Err(err) = self.wait().await {
                return Some(self.fail(err));
            }
        }
    }

    /// Reads the events after the last one sent into `pending`.
    async fn read(&mut self) -> Result<(), StoreError> {
        let batch = self
            .store
            .list_events_since(&self.job_id, self.last_sent.as_ref(), BATCH)
            .await?;
        // A full batch may have more behind it, so the next step reads again at once.
        self.read_due = batch.len() == BATCH as usize;
        self.pending.extend(batch);
        Ok(())
    }

    /// Waits for a notification for this job, a poll tick, the end of the grace after the job
    /// finished or the server shutdown, and marks a read as due.
    async fn wait(&mut self) -> Result<(), StoreError> {
        let job_id = &self.job_id;
        let subscription = &mut self.subscription;
        let notified = async {
            match subscription {
                Some(subscription) => subscription.wait_for_job(job_id).await,
                None => std::future::pending().await,
            }
        };
        let shutdown = self.shutdown.clone();
        let done_at = self.done_at;
        let grace_over = async {
            match done_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            open = notified => {
                if !open {
                    self.subscription = None;
                }
            }
            _ = self.poll.tick() => self.check_status().await?,
            _ = grace_over => {}
            _ = shutdown.cancelled() => {}
        }
        self.read_due = true;
        Ok(())
    }

    /// Reads the job's status and starts the grace before the end once it is terminal. The
    /// read that follows returns every event written before this status.
    async fn check_status(&mut self) -> Result<(), StoreError> {
        if self.done_at.is_some() {
            return Ok(());
        }
        let job = self.store.get_job(&self.job_id).await?;
        if job.status.is_terminal() {
            self.done_at = Some(done_deadline(&job));
        }
        Ok(())
    }

    /// Logs a failed read and builds the last message, an `error` event; the client resumes
    /// by reconnecting with `Last-Event-ID`.
    fn fail(&mut self, err: StoreError) -> Event {
        tracing::error!(job_id = %self.job_id, error = %err, "event stream failed");
        self.finished = true;
        let error = json!({"error": {
            "message": "reading the job's events failed; reconnect with the Last-Event-ID header to resume",
            "type": "server_error",
            "param": null,
            "code": "stream_interrupted",
        }});
        Event::default().event("error").data(error.to_string())
    }
}

/// Returns when a stream may end for a job seen in a terminal state now:
/// [`TRAILING_EVENT_GRACE`] after the job finished, and never later than that from now.
fn done_deadline(job: &JobRecord) -> Instant {
    let since_finish = job
        .finished_at
        .and_then(|finished_at| (Utc::now() - finished_at).to_std().ok())
        .unwrap_or(Duration::ZERO);
    Instant::now() + TRAILING_EVENT_GRACE.saturating_sub(since_finish)
}
