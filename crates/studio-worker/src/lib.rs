//! The Smart Studio worker: claims queued jobs, trains them on a blocking thread, streams
//! metrics, events and checkpoints to the store, and uploads the trained artifacts.

mod job;
pub mod plan;
mod progress;
mod retry;
mod trainer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use studio_core::{JobId, JobStatus};
use studio_store::{EventLevel, NewEvent, RescuedJob, Services, StoreError};
use tokio::sync::watch;
use tracing::Instrument;

pub use trainer::{CandleTrainer, Trainer};

#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Written to `locked_by` of the jobs this worker runs; unique per worker process.
    pub worker_id: String,
    /// Per-job temporary folders go here and are removed after each job.
    pub scratch_dir: PathBuf,
    /// How long to wait before looking again when the queue is empty.
    pub poll_interval: Duration,
    /// How long a claimed job stays ours without a heartbeat.
    pub lease: Duration,
    /// How often the lease is extended; must be well below `lease`.
    pub heartbeat_interval: Duration,
}

/// Runs a worker with the candle trainer until `shutdown` resolves. A job running at shutdown
/// is stopped at the next step and goes back to the queue.
pub async fn run_worker(
    services: Services,
    settings: WorkerSettings,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    Worker::new(services, settings, Arc::new(CandleTrainer))
        .run(shutdown)
        .await
}

pub struct Worker {
    services: Services,
    settings: WorkerSettings,
    trainer: Arc<dyn Trainer>,
}

impl Worker {
    pub fn new(services: Services, settings: WorkerSettings, trainer: Arc<dyn Trainer>) -> Self {
        Self {
            services,
            settings,
            trainer,
        }
    }

    /// Claims and runs jobs until `shutdown` resolves.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let work = self.work_loop(stopped);
        tokio::pin!(work, shutdown);
        tokio::select! {
            result = &mut work => return result,
            _ = &mut shutdown => {
                tracing::info!(worker_id = %self.settings.worker_id, "worker shutting down");
                let _ = stop.send(true);
            }
        }
        work.await
    }

    async fn work_loop(&self, mut stopped: watch::Receiver<bool>) -> anyhow::Result<()> {
        let worker_id = self.settings.worker_id.as_str();
        // Consecutive failed rounds; the wait after each grows with backoff and jitter.
        let mut failures = 0u32;
        while !*stopped.borrow() {
            let wait = match self.run_next_job(stopped.clone()).await {
                Err(err) => {
                    if failures == 0 {
                        tracing::warn!(worker_id, error = %err, "queue access failed; retrying with backoff");
                    } else {
                        tracing::debug!(worker_id, failures, error = %err, "queue access failed again");
                    }
                    let wait = retry::backoff(failures, retry::random_jitter());
                    failures = failures.saturating_add(1);
                    Some(wait.max(self.settings.poll_interval))
                }
                Ok(ran) => {
                    if failures > 0 {
                        tracing::info!(worker_id, failures, "queue access works again");
                        failures = 0;
                    }
                    // An empty queue waits; after a job the next one is claimed at once.
                    ran.is_none().then_some(self.settings.poll_interval)
                }
            };
            if let Some(wait) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => {}
                }
            }
        }
        Ok(())
    }

    /// Writes an event that explains why the job left `running` without a word from its worker.
    async fn record_rescue(&self, rescued: &RescuedJob) {
        let (level, message) = match rescued.status {
            JobStatus::Queued => (
                EventLevel::Warn,
                "The worker stopped sending heartbeats; the job goes back to the queue and resumes from its latest checkpoint",
            ),
            JobStatus::Cancelled => (
                EventLevel::Info,
                "The worker stopped sending heartbeats; the job was cancelled as requested",
            ),
            JobStatus::Paused => (
                EventLevel::Info,
                "The worker stopped sending heartbeats; the job was paused as requested and resumes from its latest checkpoint",
            ),
            _ => (
                EventLevel::Error,
                "The worker stopped sending heartbeats and the job is out of attempts; it failed",
            ),
        };
        let event = NewEvent::message(&rescued.id, level, message);
        if let Err(err) = self.services.store.insert_event(&event).await {
            tracing::warn!(job_id = %rescued.id, error = %err, "failed to write a job event");
        }
    }

    /// Requeues jobs whose worker vanished, then claims and runs the oldest queued job.
    /// Returns its id, or `None` when the queue is empty.
    pub async fn run_next_job(
        &self,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Option<JobId>, StoreError> {
        let store = &self.services.store;
        for rescued in store.rescue_expired_jobs().await? {
            tracing::warn!(job_id = %rescued.id, status = %rescued.status, "rescued a job whose lease expired");
            self.record_rescue(&rescued).await;
        }
        let Some(job) = store
            .claim_job(&self.settings.worker_id, self.settings.lease)
            .await?
        else {
            return Ok(None);
        };

        let id = job.id.clone();
        let span = tracing::info_span!("job", job_id = %id, worker_id = %self.settings.worker_id);
        let run = job::JobRun {
            services: &self.services,
            settings: &self.settings,
            trainer: self.trainer.clone(),
            job,
        };
        run.run(shutdown).instrument(span).await?;
        Ok(Some(id))
    }
}
