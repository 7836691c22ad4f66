//! Postgres `LISTEN` on the job events channel, forwarded to an in-process [`EventBus`], so
//! that API processes learn of events that workers on other machines insert.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use studio_core::JobId;
use tokio::sync::OnceCell;
use tokio::task::AbortHandle;

use crate::event_bus::{EventBus, EventNotice, EventSubscription};
use crate::StoreError;

/// The channel that `insert_event` notifies with the job id as payload.
pub(crate) const EVENTS_CHANNEL: &str = "studio_job_events";

/// The first and the longest wait between attempts to reopen a lost listener connection.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// Starts one listener task on the first subscription and stops it when the last clone of the
/// store is dropped or its pool is closed.
#[derive(Clone)]
pub(crate) struct PgEventListener {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    bus: EventBus,
    task: OnceCell<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

impl fmt::Debug for PgEventListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgEventListener")
            .field("started", &self.inner.task.initialized())
            .finish()
    }
}

impl PgEventListener {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                bus: EventBus::new(),
                task: OnceCell::new(),
            }),
        }
    }

    /// Subscribes to notices, starting the listener first when none runs. Once this returns,
    /// every event committed later wakes the subscription. The listener keeps one connection of
    /// the pool checked out.
    pub(crate) async fn subscribe(&self) -> Result<EventSubscription, StoreError> {
        let subscription = self.inner.bus.subscribe();
        self.inner
            .task
            .get_or_try_init(|| async {
                let listener = listen(&self.inner.pool).await?;
                let task = tokio::spawn(forward(
                    listener,
                    self.inner.pool.clone(),
                    self.inner.bus.clone(),
                ));
                tracing::debug!(
                    channel = EVENTS_CHANNEL,
                    "listening for job event notifications"
                );
                Ok::<_, StoreError>(task.abort_handle())
            })
            .await?;
        Ok(subscription)
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(EVENTS_CHANNEL).await?;
    Ok(listener)
}

/// Forwards notifications to `bus` until the pool is closed. After the connection was lost it
/// sends [`EventNotice::Missed`] once listening again, because notifications sent in between are
/// gone.
async fn forward(mut listener: PgListener, pool: PgPool, bus: EventBus) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => match JobId::parse(notification.payload()) {
                Ok(job_id) => bus.publish(EventNotice::Inserted(job_id)),
                Err(err) => tracing::warn!(
                    channel = EVENTS_CHANNEL,
                    error = %err,
                    "ignored a notification whose payload is not a job id"
                ),
            },
            // The listener reconnected by itself before returning `None`.
            Ok(None) => {
                tracing::warn!(
                    channel = EVENTS_CHANNEL,
                    "the connection for job event notifications was lost and reopened"
                );
                bus.publish(EventNotice::Missed);
            }
            Err(_) if pool.is_closed() => return,
            Err(err) => {
                tracing::warn!(
                    channel = EVENTS_CHANNEL,
                    error = %err,
                    "job event notifications stopped; reconnecting"
                );
                match reconnect(&pool).await {
                    Some(reopened) => listener = reopened,
                    None => return,
                }
                bus.publish(EventNotice::Missed);
            }
        }
    }
}

/// Opens a new listener, retrying with a doubling delay. Returns `None` once the pool is closed.
async fn reconnect(pool: &PgPool) -> Option<PgListener> {
    let mut delay = RECONNECT_DELAY;
    let mut attempt: u32 = 1;
    loop {
        tokio::time::sleep(delay).await;
        if pool.is_closed() {
            return None;
        }
        match listen(pool).await {
            Ok(listener) => {
                tracing::info!(
                    channel = EVENTS_CHANNEL,
                    attempt,
                    "listening for job event notifications again"
                );
                return Some(listener);
            }
            Err(_) if pool.is_closed() => return None,
            Err(err) => {
                tracing::warn!(
                    channel = EVENTS_CHANNEL,
                    attempt,
                    retry_in_s = (delay * 2).min(MAX_RECONNECT_DELAY).as_secs(),
                    error = %err,
                    "failed to reopen the connection for job event notifications"
                );
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                attempt += 1;
            }
        }
    }
}
