//! Wake-ups for readers of job events, such as the API's event streams.
//!
//! A notice only signals that something may have changed. Readers then call
//! [`Store::list_events_since`](crate::Store::list_events_since) from the last event they have,
//! so a duplicated notice costs one query and never a duplicated event.

use studio_core::JobId;
use tokio::sync::broadcast;

/// How many notices a subscriber may fall behind before it gets [`EventNotice::Missed`].
const CAPACITY: usize = 256;

/// A wake-up sent after an event insert commits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventNotice {
    /// An event of this job was inserted.
    Inserted(JobId),
    /// Notices may have been lost, because the subscriber fell behind or the Postgres listener
    /// reconnected. Every reader re-reads the jobs it follows.
    Missed,
}

/// The in-process channel that carries [`EventNotice`]s to every subscriber.
#[derive(Clone, Debug)]
pub(crate) struct EventBus {
    sender: broadcast::Sender<EventNotice>,
}

impl EventBus {
    pub(crate) fn new() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }

    pub(crate) fn publish(&self, notice: EventNotice) {
        // An error only means that no subscriber exists right now.
        let _ = self.sender.send(notice);
    }

    pub(crate) fn subscribe(&self) -> EventSubscription {
        EventSubscription {
            receiver: self.sender.subscribe(),
        }
    }
}

/// One subscriber's view of the notices sent after it subscribed.
#[derive(Debug)]
pub struct EventSubscription {
    receiver: broadcast::Receiver<EventNotice>,
}

impl EventSubscription {
    /// Waits for the next notice. A subscriber that fell behind gets [`EventNotice::Missed`].
    /// Returns `None` once the store that sends the notices is dropped.
    ///
    /// Cancel safe: a notice is consumed only when this returns it.
    pub async fn recv(&mut self) -> Option<EventNotice> {
        match self.receiver.recv().await {
            Ok(notice) => Some(notice),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(EventNotice::Missed),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Waits until `job_id` may have new events: a notice for it, or [`EventNotice::Missed`].
    /// Returns `false` once no notice can come any more.
    ///
    /// Cancel safe: notices of other jobs are the only ones it drops.
    pub async fn wait_for_job(&mut self, job_id: &JobId) -> bool {
        loop {
            match self.recv().await {
                Some(EventNotice::Inserted(id)) if &id == job_id => return true,
                Some(EventNotice::Inserted(_)) => continue,
                Some(EventNotice::Missed) => return true,
                None => return false,
            }
        }
    }
}
