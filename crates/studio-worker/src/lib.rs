//! The Smart Studio worker: claims queued jobs, trains them on a blocking thread, streams
//! metrics, events and checkpoints to the store, and uploads the trained artifacts.

mod job;
pub mod plan;
mod progress;
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
        while !*stopped.borrow() {
            let idle = match self.run_next_job(stopped.clone()).await {
                Ok(Some(_)) => false,
                Ok(None) => true,
                Err(err) => {
                    tracing::warn!(worker_id = %self.settings.worker_id, error = %err, "queue access failed; retrying after the poll interval");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
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
