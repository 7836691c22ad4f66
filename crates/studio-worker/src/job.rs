//! Runs one claimed job from start to its final state.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use studio_core::dataset::{parse_dataset, Conversation};
use studio_core::JobSpec;
use studio_store::keys::{file_key, final_adapter_key, ADAPTER_FILES};
use studio_store::{EventLevel, JobError, JobRecord, NewEvent, Services, StoreError};
use studio_train::{Approach, LoraSettings, RunOutcome, SftJob, TrainError, TrainSettings};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::progress::{write_progress, ChannelObserver, StopFlags};
use crate::{Trainer, WorkerSettings};

/// Everything a run needs, loaded before the trainer starts.
struct Prepared {
    examples: Vec<Conversation>,
    model_path: PathBuf,
}

/// The end of a run as the trainer reported it.
enum Ended {
    Trained { trained_tokens: u64 },
    Stopped,
    Failed(JobError),
}

pub(crate) struct JobRun<'a> {
    pub services: &'a Services,
    pub settings: &'a WorkerSettings,
    pub trainer: Arc<dyn Trainer>,
    pub job: JobRecord,
}

impl JobRun<'_> {
    /// Trains the job and records its final state. Errors are store failures; the job's own
    /// failures are recorded on the job.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        self.event(
            EventLevel::Info,
            format!(
                "Fine-tuning job started (attempt {} of {})",
                self.job.attempt, self.job.max_attempts
            ),
        )
        .await;
        let flags = Arc::new(StopFlags::default());
        let heartbeat = self.spawn_heartbeat(flags.clone(), shutdown);
        let scratch = self.settings.scratch_dir.join(self.job.id.as_str());

        let ended = match self.prepare().await {
            Ok(prepared) => self.train(prepared, &scratch, flags.clone()).await,
            Err(error) => Ended::Failed(error),
        };
        heartbeat.abort();
        let result = self.finish(ended, &flags, &scratch).await;
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        result
    }

    async fn prepare(&self) -> Result<Prepared, JobError> {
        let spec = &self.job.spec;
        let bytes = self
            .services
            .artifacts
            .read(&file_key(&spec.training_file))
            .await
            .map_err(|err| JobError {
                code: "invalid_training_file".into(),
                message: format!("cannot read training file {}: {err}", spec.training_file),
                param: Some("training_file".into()),
            })?;
        let (examples, summary) = tokio::task::spawn_blocking(move || parse_dataset(&bytes))
            .await
            .map_err(|err| internal_error(format!("dataset parsing stopped unexpectedly: {err}")))?
            .map_err(|err| JobError {
                code: "invalid_training_file".into(),
                message: format!("training file {}: {err}", spec.training_file),
                param: Some("training_file".into()),
            })?;
        self.event(
            EventLevel::Info,
            format!(
                "Read {} training examples in the {} format",
                summary.line_count,
                summary.format.as_str()
            ),
        )
        .await;
        if spec.validation_file.is_some() {
            self.event(
                EventLevel::Warn,
                "validation_file is not evaluated yet; training uses training_file only".into(),
            )
            .await;
        }

        let model = self
            .services
            .models
            .resolve(&spec.model)
            .map_err(|err| JobError {
                code: "model_not_found".into(),
                message: err.to_string(),
                param: Some("model".into()),
            })?;
        self.event(
            EventLevel::Info,
            format!("Loading base model {}", spec.model),
        )
        .await;
        Ok(Prepared {
            examples,
            model_path: model.path,
        })
    }

    async fn train(&self, prepared: Prepared, scratch: &Path, flags: Arc<StopFlags>) -> Ended {
        // The trainer writes `adapter/` under this folder.
        let output_dir = scratch.to_path_buf();
        if let Err(err) = tokio::fs::create_dir_all(&output_dir).await {
            return Ended::Failed(internal_error(format!(
                "cannot create the scratch folder: {err}"
            )));
        }

        let (sender, receiver) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_progress(
            self.services.store.clone(),
            self.job.id.clone(),
            self.settings.worker_id.clone(),
            flags.clone(),
            receiver,
        ));
        let observer = ChannelObserver { sender, flags };
        let trainer = self.trainer.clone();
        let spec = self.job.spec.clone();
        let span = tracing::Span::current();
        let training = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            run_trainer(trainer.as_ref(), &spec, prepared, &output_dir, observer)
        });

        let outcome = training.await;
        // The observer was dropped with the blocking task, so the writer drains and ends.
        let _ = writer.await;
        match outcome {
            Ok(Ok(RunOutcome::Succeeded(summary))) => Ended::Trained {
                trained_tokens: summary.trained_tokens,
            },
            Ok(Ok(RunOutcome::Cancelled { .. })) => Ended::Stopped,
            Ok(Err(err)) => Ended::Failed(train_error(&err)),
            Err(join_error) => Ended::Failed(internal_error(format!(
                "the trainer stopped unexpectedly: {}",
                panic_message(join_error)
            ))),
        }
    }

    async fn finish(
        &self,
        ended: Ended,
        flags: &StopFlags,
        scratch: &Path,
    ) -> Result<(), StoreError> {
        let id = &self.job.id;
        let worker_id = self.settings.worker_id.as_str();
        let store = &self.services.store;
        if flags.lost.load(Ordering::Relaxed) {
            tracing::warn!("the job was taken from this worker; its result is discarded");
            return Ok(());
        }
        match ended {
            Ended::Trained { trained_tokens } => {
                if let Err(err) = self.upload_adapter(&scratch.join("adapter")).await {
                    let error = internal_error(format!("failed to store the adapter: {err}"));
                    self.event(
                        EventLevel::Error,
                        format!("Fine-tuning job failed: {}", error.message),
                    )
                    .await;
                    store.fail_job(id, worker_id, &error).await?;
                    return Ok(());
                }
                let fine_tuned_model = self.job.spec.fine_tuned_model(id);
                self.event(
                    EventLevel::Info,
                    format!("The job has successfully completed: {fine_tuned_model}"),
                )
                .await;
                store
                    .complete_job(id, worker_id, &fine_tuned_model, trained_tokens)
                    .await?;
                tracing::info!(%fine_tuned_model, trained_tokens, "fine-tuning job succeeded");
            }
            Ended::Stopped if flags.cancel.load(Ordering::Relaxed) => {
                self.event(EventLevel::Info, "The job was cancelled".into())
                    .await;
                store.cancel_running_job(id, worker_id).await?;
                tracing::info!("fine-tuning job cancelled");
            }
            Ended::Stopped => {
                self.event(
                    EventLevel::Info,
                    "The worker is shutting down; the job goes back to the queue".into(),
                )
                .await;
                store.release_job(id, worker_id).await?;
                tracing::info!("fine-tuning job released for another worker");
            }
            Ended::Failed(error) => {
                self.event(
                    EventLevel::Error,
                    format!("Fine-tuning job failed: {}", error.message),
                )
                .await;
                store.fail_job(id, worker_id, &error).await?;
                tracing::warn!(code = %error.code, message = %error.message, "fine-tuning job failed");
            }
        }
        Ok(())
    }

    async fn upload_adapter(&self, output_dir: &Path) -> Result<(), StoreError> {
        for name in ADAPTER_FILES {
            let key = final_adapter_key(&self.job.id, name);
            self.services
                .artifacts
                .put_file(&key, &output_dir.join(name))
                .await?;
        }
        Ok(())
    }

    /// Extends the lease every `heartbeat_interval` and raises the stop flags on a cancel
    /// request, a lost job or a worker shutdown.
    fn spawn_heartbeat(
        &self,
        flags: Arc<StopFlags>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let store = self.services.store.clone();
        let id = self.job.id.clone();
        let worker_id = self.settings.worker_id.clone();
        let (interval, lease) = (self.settings.heartbeat_interval, self.settings.lease);
        let span = tracing::Span::current();
        let heartbeat = async move {
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            // A dropped sender means no shutdown signal can come any more, not a shutdown.
            let mut shutdown_open = true;
            if *shutdown.borrow_and_update() {
                flags.shutdown.store(true, Ordering::Relaxed);
            }
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    changed = shutdown.changed(), if shutdown_open => {
                        match changed {
                            Ok(()) if *shutdown.borrow() => flags.shutdown.store(true, Ordering::Relaxed),
                            Ok(()) => {}
                            Err(_) => shutdown_open = false,
                        }
                        continue;
                    }
                }
                match store.heartbeat(&id, &worker_id, lease).await {
                    Ok(beat) if beat.cancel_requested => {
                        flags.cancel.store(true, Ordering::Relaxed)
                    }
                    Ok(_) => {}
                    Err(StoreError::Conflict(message)) => {
                        tracing::warn!(%message, "stopping the run: the job was taken from this worker");
                        flags.lost.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "heartbeat failed; retrying at the next interval")
                    }
                }
            }
        };
        tokio::spawn(tracing::Instrument::instrument(heartbeat, span))
    }

    async fn event(&self, level: EventLevel, message: String) {
        if let Err(err) = self
            .services
            .store
            .insert_event(&NewEvent::message(&self.job.id, level, message))
            .await
        {
            tracing::warn!(error = %err, "failed to write a job event");
        }
    }
}

fn run_trainer(
    trainer: &dyn Trainer,
    spec: &JobSpec,
    prepared: Prepared,
    output_dir: &Path,
    mut observer: ChannelObserver,
) -> Result<RunOutcome, TrainError> {
    let lora = spec.lora();
    let hyperparameters = spec.hyperparameters();
    let job = SftJob {
        model_path: &prepared.model_path,
        base_model_name: &spec.model,
        examples: &prepared.examples,
        validation: None,
        approach: Approach::Lora(LoraSettings {
            r: lora.r as usize,
            alpha: lora.alpha,
            dropout: lora.dropout,
            target_modules: lora.target_modules.clone(),
            use_rslora: false,
        }),
        settings: TrainSettings {
            n_epochs: hyperparameters.n_epochs as usize,
            batch_size: hyperparameters.batch_size as usize,
            learning_rate: hyperparameters.learning_rate,
            max_seq_len: hyperparameters.max_seq_len as usize,
            weight_decay: hyperparameters.weight_decay,
            seed: spec.seed,
            ..TrainSettings::default()
        },
        output_dir,
        checkpoint_dir: None,
        resume_from: None,
        export_merged: false,
    };
    trainer.run_sft(&job, &mut observer)
}

fn train_error(err: &TrainError) -> JobError {
    JobError {
        code: err.code().to_owned(),
        message: err.to_string(),
        param: err.param().map(str::to_owned),
    }
}

fn internal_error(message: String) -> JobError {
    JobError {
        code: "internal_error".into(),
        message,
        param: None,
    }
}

fn panic_message(err: tokio::task::JoinError) -> String {
    match err.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(err) => err.to_string(),
    }
}
