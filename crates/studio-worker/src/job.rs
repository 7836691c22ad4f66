//! Runs one claimed job from start to its final state.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use studio_core::dataset::{DatasetFormat, Role};
use studio_store::NewFile;
use studio_train::distill::teacher_replies;
use studio_core::dataset::{parse_dataset, parse_preference_dataset, Conversation, PreferencePair};
use studio_core::{FileId, JobSpec, JobStatus};
use studio_store::keys::{file_key, final_artifact_prefix, results_csv_key};
use studio_store::{
    EventLevel, JobError, JobRecord, MetricPoint, NewEvent, PageRequest, RewardMetrics, Services, StoreError,
};
use studio_train::{ArtifactKind, DistillJob, DpoJob, RunOutcome, SftJob, TrainError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::plan::{approach, distill_settings, teacher_reply_params, train_settings};
use crate::progress::{write_progress, ChannelObserver, ProgressSink, StopFlags};
use crate::retry::retry_unavailable;
use crate::{Trainer, WorkerSettings};

/// Everything a run needs, loaded before the trainer starts.
struct Prepared {
    examples: Vec<Conversation>,
    validation: Option<Vec<Conversation>>,
    /// The preference pairs of a DPO job, whose `examples` stay empty.
    pairs: Vec<PreferencePair>,
    /// The validation pairs of a DPO job, whose `validation` stays empty.
    validation_pairs: Option<Vec<PreferencePair>>,
    model_path: PathBuf,
    /// The latest checkpoint of an earlier attempt, downloaded into the scratch folder.
    resume_from: Option<PathBuf>,
    /// The teacher of a distillation job.
    teacher: Option<Teacher>,
}

/// A distillation teacher on disk: a base model, or a job's result in the scratch folder.
struct Teacher {
    path: PathBuf,
    /// The adapter of a teacher fine-tuned with LoRA, applied on the base model at `path`.
    adapter: Option<PathBuf>,
}

/// The scratch folders of one run.
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    /// Receives the trainer's `adapter/`, `merged/` or `model/`.
    fn output(&self) -> PathBuf {
        self.root.join("output")
    }

    /// Receives the trainer's `step-{n}/` folders until they are uploaded.
    fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Receives the checkpoint a re-claimed job resumes from.
    fn resume(&self) -> PathBuf {
        self.root.join("resume")
    }
}

/// The end of a run as the trainer reported it.
enum Ended {
    Trained {
        trained_tokens: u64,
        artifacts: Vec<(ArtifactKind, PathBuf)>,
    },
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
        let scratch = Scratch {
            root: self.settings.scratch_dir.join(self.job.id.as_str()),
        };

        let ended = match self.prepare(&scratch, &flags).await {
            Ok(Some(prepared)) => self.train(prepared, &scratch, flags.clone()).await,
            Ok(None) => Ended::Stopped,
            Err(error) => Ended::Failed(error),
        };
        heartbeat.abort();
        let result = self.finish(ended, &flags).await;
        let _ = tokio::fs::remove_dir_all(&scratch.root).await;
        result
    }

    /// Loads what the run needs. Returns `None` when a stop request arrives while a teacher
    /// writes replies, before any training step.
    async fn prepare(&self, scratch: &Scratch, flags: &Arc<StopFlags>) -> Result<Option<Prepared>, JobError> {
        let spec = &self.job.spec;
        if spec.dpo_beta().is_some() {
            return self.prepare_dpo(scratch).await.map(Some);
        }
        let examples = self.read_dataset(&spec.training_file, "training").await?;
        let validation = match &spec.validation_file {
            Some(file) => Some(self.read_dataset(file, "validation").await?),
            None => None,
        };

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
        let resume_from = self.download_latest_checkpoint(scratch).await?;
        let teacher = match spec.distillation() {
            Some(distillation) => Some(self.fetch_teacher(&distillation.teacher_model, scratch).await?),
            None => None,
        };
        // Only the training file gets teacher replies: the API rejects a prompts-only
        // validation file.
        if teacher.is_some() && is_prompts_only(&examples) {
            check_student_layers(spec, &model.path).await?;
        }
        let examples = match &teacher {
            Some(teacher) if is_prompts_only(&examples) => match self.write_teacher_replies(teacher, examples, flags).await? {
                Some(examples) => examples,
                None => return Ok(None),
            },
            _ => examples,
        };
        Ok(Some(Prepared {
            examples,
            validation,
            pairs: Vec::new(),
            validation_pairs: None,
            model_path: model.path,
            resume_from,
            teacher,
        }))
    }

    /// Has the teacher answer a prompts-only training file, greedily, and stores the result as a
    /// new fine-tune file whose id an event names, so the user can fetch it.
    /// Returns `None` when a stop request arrives first. The replies written until then are
    /// dropped, so a resumed job has the teacher start over.
    async fn write_teacher_replies(
        &self,
        teacher: &Teacher,
        prompts: Vec<Conversation>,
        flags: &Arc<StopFlags>,
    ) -> Result<Option<Vec<Conversation>>, JobError> {
        let spec = &self.job.spec;
        self.event(EventLevel::Info, format!("The teacher is writing replies to {} prompts", prompts.len())).await;
        let params = teacher_reply_params(spec);
        let (path, adapter) = (teacher.path.clone(), teacher.adapter.clone());
        let job_id = self.job.id.clone();
        let flags = flags.clone();
        let conversations = tokio::task::spawn_blocking(move || {
            let mut progress = |done: usize| {
                if done.is_multiple_of(25) {
                    tracing::info!(job_id = %job_id, done, "teacher replies written");
                }
                match flags.request() {
                    Some(_) => ControlFlow::Break(()),
                    None => ControlFlow::Continue(()),
                }
            };
            teacher_replies(&path, adapter.as_deref(), &prompts, &params, &mut progress)
        })
        .await
        .map_err(|err| internal_error(format!("the teacher stopped unexpectedly: {err}")))?
        .map_err(|err| train_error(&err))?;
        let Some(conversations) = conversations else {
            self.event(EventLevel::Info, "The teacher stopped before writing every reply, and its replies are not kept".into()).await;
            return Ok(None);
        };

        let mut bytes = Vec::new();
        for conversation in &conversations {
            let messages: Vec<serde_json::Value> = conversation
                .messages
                .iter()
                .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
                .collect();
            bytes.extend_from_slice(serde_json::json!({ "messages": messages }).to_string().as_bytes());
            bytes.push(b'\n');
        }
        let file = FileId::new();
        let new_file = NewFile {
            id: file.clone(),
            filename: format!("{}-teacher-replies.jsonl", self.job.id),
            purpose: "fine-tune".into(),
            bytes: bytes.len() as u64,
            sha256: format!("{:x}", Sha256::digest(&bytes)),
            format: DatasetFormat::Chat,
            line_count: conversations.len() as u64,
            idempotency_key: None,
        };
        let stored = async {
            self.services.artifacts.put_bytes(&file_key(&file), &bytes).await?;
            self.retry("insert the teacher's replies", || self.services.store.insert_file(&new_file)).await
        };
        stored
            .await
            .map_err(|err| internal_error(format!("cannot store the teacher's replies as file {file}: {err}")))?;
        self.event(
            EventLevel::Info,
            format!("The teacher's replies are in file {file}; fetch them from /v1/files/{file}/content"),
        )
        .await;
        Ok(Some(conversations))
    }

    /// Finds a distillation teacher: an installed base model, or a succeeded job whose adapter
    /// or model folder is downloaded into the scratch folder.
    async fn fetch_teacher(&self, name: &str, scratch: &Scratch) -> Result<Teacher, JobError> {
        let not_found = |message: String| JobError {
            code: "model_not_found".into(),
            message,
            param: Some("method.distillation.teacher_model".into()),
        };
        if let Ok(base) = self.services.models.resolve(name) {
            return Ok(Teacher { path: base.path, adapter: None });
        }
        // NOTE: scans every succeeded job, as chat completions do.
        let jobs = self.retry("list succeeded jobs", || self.services.store.list_succeeded_jobs()).await.map_err(|err| {
            internal_error(format!("cannot look up teacher model {name}: {err}"))
        })?;
        let Some(job) = jobs.into_iter().find(|job| job.fine_tuned_model.as_deref() == Some(name)) else {
            return Err(not_found(format!(
                "teacher model '{name}' not found; use a base model or a succeeded job's fine_tuned_model"
            )));
        };
        let kind = if job.spec.lora().is_some() { "adapter" } else { "model" };
        let dir = scratch.root.join("teacher").join(kind);
        let _ = tokio::fs::remove_dir_all(&dir).await;
        self.services
            .artifacts
            .get_dir(&final_artifact_prefix(&job.id, kind), &dir)
            .await
            .map_err(|err| internal_error(format!("cannot download teacher model {name}: {err}")))?;
        self.event(EventLevel::Info, format!("Downloaded teacher model {name}")).await;
        if job.spec.lora().is_none() {
            return Ok(Teacher { path: dir, adapter: None });
        }
        let base = self.services.models.resolve(&job.spec.model).map_err(|err| {
            not_found(format!("the base model of teacher {name} is no longer installed: {err}"))
        })?;
        Ok(Teacher { path: base.path, adapter: Some(dir) })
    }

    /// Reads a DPO job's preference pairs, resolves its model and fetches its checkpoint.
    async fn prepare_dpo(&self, scratch: &Scratch) -> Result<Prepared, JobError> {
        let spec = &self.job.spec;
        let pairs = self.read_pairs(&spec.training_file, "training").await?;
        let validation_pairs = match &spec.validation_file {
            Some(file) => Some(self.read_pairs(file, "validation").await?),
            None => None,
        };
        let model = self.services.models.resolve(&spec.model).map_err(|err| JobError {
            code: "model_not_found".into(),
            message: err.to_string(),
            param: Some("model".into()),
        })?;
        self.event(EventLevel::Info, format!("Loading base model {}", spec.model)).await;
        let resume_from = self.download_latest_checkpoint(scratch).await?;
        Ok(Prepared {
            examples: Vec::new(),
            validation: None,
            pairs,
            validation_pairs,
            model_path: model.path,
            resume_from,
            teacher: None,
        })
    }

    /// Reads and parses an uploaded file of preference pairs; `role` is `training` or
    /// `validation`.
    async fn read_pairs(&self, file: &FileId, role: &str) -> Result<Vec<PreferencePair>, JobError> {
        let (param, code) = (format!("{role}_file"), format!("invalid_{role}_file"));
        let bytes = self.read_upload(file, role).await?;
        let pairs = tokio::task::spawn_blocking(move || parse_preference_dataset(&bytes))
            .await
            .map_err(|err| internal_error(format!("dataset parsing stopped unexpectedly: {err}")))?
            .map_err(|err| JobError {
                code,
                message: format!("{role} file {file}: {err}; a DPO job needs preference pairs"),
                param: Some(param),
            })?;
        let count = pairs.len();
        let noun = if count == 1 { "pair" } else { "pairs" };
        self.event(EventLevel::Info, format!("Read {count} {role} preference {noun}")).await;
        Ok(pairs)
    }

    /// Reads and parses an uploaded dataset; `role` is `training` or `validation`.
    async fn read_dataset(&self, file: &FileId, role: &str) -> Result<Vec<Conversation>, JobError> {
        let (param, code) = (format!("{role}_file"), format!("invalid_{role}_file"));
        let bytes = self.read_upload(file, role).await?;
        let (examples, summary) = tokio::task::spawn_blocking(move || parse_dataset(&bytes))
            .await
            .map_err(|err| internal_error(format!("dataset parsing stopped unexpectedly: {err}")))?
            .map_err(|err| JobError {
                code,
                message: format!("{role} file {file}: {err}"),
                param: Some(param),
            })?;
        self.event(
            EventLevel::Info,
            format!(
                "Read {} {role} examples in the {} format",
                summary.line_count,
                summary.format.as_str()
            ),
        )
        .await;
        Ok(examples)
    }

    /// Reads an uploaded file's bytes; `role` is `training` or `validation`.
    async fn read_upload(&self, file: &FileId, role: &str) -> Result<Vec<u8>, JobError> {
        self.services.artifacts.read(&file_key(file)).await.map_err(|err| JobError {
            code: format!("invalid_{role}_file"),
            message: format!("cannot read {role} file {file}: {err}"),
            param: Some(format!("{role}_file")),
        })
    }

    /// Downloads the latest checkpoint of an earlier attempt, if any, so the run resumes there.
    async fn download_latest_checkpoint(
        &self,
        scratch: &Scratch,
    ) -> Result<Option<PathBuf>, JobError> {
        let first = PageRequest::first(1);
        let latest = self
            .retry("list_checkpoints", || {
                self.services.store.list_checkpoints(&self.job.id, &first)
            })
            .await
            .map_err(|err| {
                internal_error(format!("cannot look up the job's checkpoints: {err}"))
            })?;
        let Some(checkpoint) = latest.data.into_iter().next() else {
            return Ok(None);
        };
        let dir = scratch.resume().join(format!("step-{}", checkpoint.step));
        self.services
            .artifacts
            .get_dir(&checkpoint.artifact_key, &dir)
            .await
            .map_err(|err| {
                internal_error(format!(
                    "cannot download checkpoint {} at step {}: {err}",
                    checkpoint.id, checkpoint.step
                ))
            })?;
        self.event(
            EventLevel::Info,
            format!("Resuming from step {}", checkpoint.step),
        )
        .await;
        Ok(Some(dir))
    }

    async fn train(&self, prepared: Prepared, scratch: &Scratch, flags: Arc<StopFlags>) -> Ended {
        let (output_dir, checkpoint_dir) = (scratch.output(), scratch.checkpoints());
        for dir in [&output_dir, &checkpoint_dir] {
            if let Err(err) = tokio::fs::create_dir_all(dir).await {
                return Ended::Failed(internal_error(format!(
                    "cannot create the scratch folder {}: {err}",
                    dir.display()
                )));
            }
        }

        let (sender, receiver) = mpsc::unbounded_channel();
        let sink = ProgressSink {
            store: self.services.store.clone(),
            artifacts: self.services.artifacts.clone(),
            job_id: self.job.id.clone(),
            worker_id: self.settings.worker_id.clone(),
            flags: flags.clone(),
            patience: self.settings.lease,
        };
        let writer = tokio::spawn(write_progress(sink, receiver));
        let observer = ChannelObserver { sender, flags };
        let trainer = self.trainer.clone();
        let spec = self.job.spec.clone();
        let span = tracing::Span::current();
        let training = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let folders = RunFolders {
                output: &output_dir,
                checkpoints: &checkpoint_dir,
            };
            run_trainer(trainer.as_ref(), &spec, prepared, folders, observer)
        });

        let outcome = training.await;
        // The observer was dropped with the blocking task, so the writer drains and ends.
        let _ = writer.await;
        match outcome {
            Ok(Ok(RunOutcome::Succeeded(summary))) => Ended::Trained {
                trained_tokens: summary.trained_tokens,
                artifacts: summary.artifacts,
            },
            Ok(Ok(RunOutcome::Stopped { .. })) => Ended::Stopped,
            Ok(Err(err)) => Ended::Failed(train_error(&err)),
            Err(join_error) => Ended::Failed(internal_error(format!(
                "the trainer stopped unexpectedly: {}",
                panic_message(join_error)
            ))),
        }
    }

    /// Records the end of the run. Store calls are retried while the database is unavailable,
    /// for as long as the lease would last, so an outage does not lose the result.
    async fn finish(&self, ended: Ended, flags: &StopFlags) -> Result<(), StoreError> {
        let id = &self.job.id;
        let worker_id = self.settings.worker_id.as_str();
        let store = &self.services.store;
        if flags.lost.load(Ordering::Relaxed) {
            tracing::warn!("the job was taken from this worker; its result is discarded");
            return Ok(());
        }
        match ended {
            Ended::Trained {
                trained_tokens,
                artifacts,
            } => {
                // Every attempt writes the same final keys, so ownership is confirmed (and the
                // lease extended) just before: a worker whose lease ran out unnoticed must not
                // overwrite the result of the worker that took the job over.
                // NOTE: an upload that takes longer than the lease can still race a rescue.
                let confirmed = self
                    .retry("heartbeat", || store.heartbeat(id, worker_id, self.settings.lease))
                    .await;
                match confirmed {
                    Err(StoreError::Conflict(message)) => {
                        tracing::warn!(%message, "the job was taken from this worker; its result is discarded");
                        return Ok(());
                    }
                    other => other.map(|_| ())?,
                }
                if let Err(err) = self.upload_results(&artifacts).await {
                    // Storage that failed once may work on the next attempt, which resumes
                    // from the latest checkpoint; the last attempt fails the job.
                    let error = internal_error(format!("failed to store the result: {err}"));
                    self.event(
                        EventLevel::Error,
                        format!("Storing the result failed; the job will be retried: {}", error.message),
                    )
                    .await;
                    let job = self
                        .retry("requeue_job", || store.requeue_job(id, worker_id, &error))
                        .await?;
                    tracing::warn!(status = %job.status, message = %error.message, "storing the result failed");
                    return Ok(());
                }
                let fine_tuned_model = self.job.spec.fine_tuned_model(id);
                self.event(
                    EventLevel::Info,
                    format!("The job has successfully completed: {fine_tuned_model}"),
                )
                .await;
                self.retry("complete_job", || {
                    store.complete_job(id, worker_id, &fine_tuned_model, trained_tokens)
                })
                .await?;
                tracing::info!(%fine_tuned_model, trained_tokens, "fine-tuning job succeeded");
            }
            Ended::Stopped if flags.cancel.load(Ordering::Relaxed) => {
                self.event(EventLevel::Info, "The job was cancelled".into())
                    .await;
                self.retry("cancel_running_job", || store.cancel_running_job(id, worker_id))
                    .await?;
                tracing::info!("fine-tuning job cancelled");
            }
            Ended::Stopped if flags.pause.load(Ordering::Relaxed) => {
                self.event(
                    EventLevel::Info,
                    "The job was paused; resuming it continues from its latest checkpoint".into(),
                )
                .await;
                let job = self
                    .retry("pause_running_job", || store.pause_running_job(id, worker_id))
                    .await?;
                self.record_cancel_after_stop(job.status).await;
                tracing::info!(status = %job.status, "fine-tuning job stopped for its pause request");
            }
            Ended::Stopped => {
                self.event(
                    EventLevel::Info,
                    "The worker is shutting down; the job goes back to the queue and resumes from its latest checkpoint".into(),
                )
                .await;
                let job = self
                    .retry("release_job", || store.release_job(id, worker_id))
                    .await?;
                self.record_cancel_after_stop(job.status).await;
                tracing::info!(status = %job.status, "fine-tuning job stopped for the worker shutdown");
            }
            Ended::Failed(error) => {
                self.event(
                    EventLevel::Error,
                    format!("Fine-tuning job failed: {}", error.message),
                )
                .await;
                self.retry("fail_job", || store.fail_job(id, worker_id, &error))
                    .await?;
                tracing::warn!(code = %error.code, message = %error.message, "fine-tuning job failed");
            }
        }
        Ok(())
    }

    /// Writes an event when the store cancelled a job that this worker paused or released,
    /// because its cancel was requested after the last heartbeat.
    async fn record_cancel_after_stop(&self, status: JobStatus) {
        if status == JobStatus::Cancelled {
            self.event(
                EventLevel::Info,
                "The job was cancelled as requested".into(),
            )
            .await;
        }
    }

    /// Runs a store call, retrying while the database is unavailable for up to one lease:
    /// after that, another worker may own the job anyway.
    async fn retry<T, F, Fut>(&self, operation: &str, call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        retry_unavailable(operation, self.settings.lease, call).await
    }

    /// Uploads every artifact folder to `jobs/{id}/final/{kind}/` and the metrics as
    /// `jobs/{id}/final/results.csv`.
    async fn upload_results(
        &self,
        artifacts: &[(ArtifactKind, PathBuf)],
    ) -> Result<(), StoreError> {
        for (kind, dir) in artifacts {
            let prefix = final_artifact_prefix(&self.job.id, kind.as_str());
            let files = self.services.artifacts.put_dir(&prefix, dir).await?;
            tracing::info!(artifact = kind.as_str(), files, "artifact stored");
        }
        let metrics = self.services.store.list_metrics(&self.job.id).await?;
        self.services
            .artifacts
            .put_bytes(
                &results_csv_key(&self.job.id),
                results_csv(&metrics).as_bytes(),
            )
            .await?;
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
            let mut failing = false;
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
                    Ok(beat) => {
                        if failing {
                            tracing::info!("heartbeats succeed again");
                            failing = false;
                        }
                        if beat.cancel_requested {
                            flags.cancel.store(true, Ordering::Relaxed);
                        }
                        if beat.pause_requested {
                            flags.pause.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(StoreError::Conflict(message)) => {
                        tracing::warn!(%message, "stopping the run: the job was taken from this worker");
                        flags.lost.store(true, Ordering::Relaxed);
                        return;
                    }
                    // Logged once per outage; the lease covers several missed heartbeats.
                    Err(err) if !failing => {
                        tracing::warn!(error = %err, "heartbeat failed; retrying at each interval");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        };
        tokio::spawn(tracing::Instrument::instrument(heartbeat, span))
    }

    /// Writes a job event, retrying through a database outage; a failure is logged, since an
    /// event is not worth failing the job for.
    async fn event(&self, level: EventLevel, message: String) {
        let event = NewEvent::message(&self.job.id, level, message);
        if let Err(err) = self
            .retry("insert_event", || self.services.store.insert_event(&event))
            .await
        {
            tracing::warn!(error = %err, message = %event.message, "failed to write a job event");
        }
    }
}

struct RunFolders<'a> {
    output: &'a Path,
    checkpoints: &'a Path,
}

fn run_trainer(
    trainer: &dyn Trainer,
    spec: &JobSpec,
    prepared: Prepared,
    folders: RunFolders<'_>,
    mut observer: ChannelObserver,
) -> Result<RunOutcome, TrainError> {
    if let Some(beta) = spec.dpo_beta() {
        let job = DpoJob {
            model_path: &prepared.model_path,
            base_model_name: &spec.model,
            pairs: &prepared.pairs,
            validation: prepared.validation_pairs.as_deref(),
            approach: approach(spec),
            settings: train_settings(spec),
            beta,
            output_dir: folders.output,
            checkpoint_dir: Some(folders.checkpoints),
            resume_from: prepared.resume_from.as_deref(),
            export_merged: false,
        };
        return trainer.run_dpo(&job, &mut observer);
    }
    let job = SftJob {
        model_path: &prepared.model_path,
        base_model_name: &spec.model,
        examples: &prepared.examples,
        validation: prepared.validation.as_deref(),
        approach: approach(spec),
        settings: train_settings(spec),
        output_dir: folders.output,
        checkpoint_dir: Some(folders.checkpoints),
        resume_from: prepared.resume_from.as_deref(),
        // A merged model serves clients that cannot apply adapters, so LoRA jobs always have one.
        // The API builds the merged model on its first download, so jobs store only the adapter.
        export_merged: false,
    };
    if let (Some(distillation), Some(teacher)) = (spec.distillation(), &prepared.teacher) {
        let job = DistillJob {
            sft: job,
            teacher_path: &teacher.path,
            teacher_adapter: teacher.adapter.as_deref(),
            teacher_name: &distillation.teacher_model,
            distill: distill_settings(spec).expect("a distillation spec has distillation settings"),
        };
        return trainer.run_distillation(&job, &mut observer);
    }
    trainer.run_sft(&job, &mut observer)
}

/// Renders the metrics as CSV, one row per step; a missing value is an empty field.
fn results_csv(metrics: &[MetricPoint]) -> String {
    let optional = |value: Option<f64>| value.map(|v| v.to_string()).unwrap_or_default();
    let mut csv = String::from(
        "step,epoch,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy,learning_rate,grad_norm,tokens_per_second,trained_tokens,reward_chosen,reward_rejected,reward_accuracy,reward_margin\n",
    );
    for point in metrics {
        let reward = |pick: fn(&RewardMetrics) -> f64| optional(point.rewards.as_ref().map(pick));
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            point.step,
            point.epoch,
            point.train_loss,
            optional(point.train_mean_token_accuracy),
            optional(point.valid_loss),
            optional(point.valid_mean_token_accuracy),
            point.learning_rate,
            point.grad_norm,
            point.tokens_per_second,
            point.trained_tokens,
            reward(|r| r.reward_chosen),
            reward(|r| r.reward_rejected),
            reward(|r| r.reward_accuracy),
            reward(|r| r.reward_margin),
        ));
    }
    csv
}

/// Tells whether every conversation ends with a user turn, as a prompts-only file's do.
fn is_prompts_only(conversations: &[Conversation]) -> bool {
    conversations.iter().all(|c| c.messages.last().is_some_and(|m| m.role == Role::User))
}

/// Checks a distillation job's `student_layers` against the model's config before the teacher
/// spends time on replies, since the trainer checks them only when it builds the student. A
/// config that cannot be read is left to the trainer, whose load error names the problem.
async fn check_student_layers(spec: &JobSpec, model_path: &Path) -> Result<(), JobError> {
    let Some(layers) = distill_settings(spec).and_then(|settings| settings.student_layers) else {
        return Ok(());
    };
    let path = model_path.to_path_buf();
    let checked = tokio::task::spawn_blocking(move || {
        let config = studio_train::loader::read_config(&path)?;
        studio_train::distill::check_student_layers(&layers, config.num_hidden_layers)
    })
    .await
    .map_err(|err| internal_error(format!("the student_layers check stopped unexpectedly: {err}")))?;
    match checked {
        Err(err @ TrainError::InvalidData { .. }) => Err(train_error(&err)),
        Err(err) => {
            tracing::warn!(model_path = %model_path.display(), error = %err, "cannot read the model config to check student_layers; the trainer checks them");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
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
