//! The worker with a fake trainer against a real Postgres.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use serde_json::json;
use sqlx::PgPool;
use studio_core::dataset::DatasetFormat;
use studio_core::{CheckpointId, FileId, JobId, JobSpec, JobStatus};
use studio_store::keys::{checkpoint_prefix, file_key, final_adapter_key, results_csv_key};
use studio_store::{
    ArtifactStore, Clock, ManualClock, ModelCatalog, NewCheckpoint, NewFile, NewJob, PageRequest,
    PgStore, Services, Store, SystemClock, RETRY_MAX_DELAY,
};
use studio_train::{
    Approach, ArtifactKind, CheckpointInfo, RunOutcome, SftJob, StepMetrics, StopRequest,
    TrainError, TrainObserver, TrainSettings, TrainSummary,
};
use studio_worker::{Trainer, Worker, WorkerSettings};
use tokio::sync::watch;

const DATASET: &str = concat!(
    r#"{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]}"#,
    "\n",
    r#"{"messages":[{"role":"user","content":"Bye"},{"role":"assistant","content":"Goodbye!"}]}"#,
    "\n"
);

/// What the fake trainer does.
#[derive(Clone)]
enum Behaviour {
    /// Reports this many steps and writes a small adapter (or model, for full fine-tuning).
    Succeed {
        steps: u64,
    },
    /// Like `Succeed`, and writes a checkpoint folder after each of these steps.
    Checkpoint {
        steps: u64,
        at: Vec<u64>,
    },
    Fail,
    /// Reports a step every few milliseconds until a stop is requested, for at most this many
    /// steps. A request to suspend writes a checkpoint of the last step first.
    RunUntilStopped {
        max_steps: u64,
    },
    /// Reports steps until asked to stop, then requests a cancel of `job` through `store`
    /// before it returns, as a user whose cancel arrives after the worker's last heartbeat.
    CancelWhenStopped {
        store: Arc<dyn Store>,
        job: JobId,
    },
}

/// What the worker handed the trainer.
#[derive(Clone, Debug)]
struct SeenJob {
    approach: Approach,
    settings: TrainSettings,
    validation_examples: Option<usize>,
    has_checkpoint_dir: bool,
    export_merged: bool,
    /// The content of `trainer_state.json` in the `resume_from` folder.
    resumed_state: Option<String>,
}

struct FakeTrainer {
    behaviour: Behaviour,
    seen: Arc<Mutex<Option<SeenJob>>>,
}

const ADAPTER_CONFIG: &[u8] = br#"{"peft_type":"LORA"}"#;
const ADAPTER_WEIGHTS: &[u8] = b"fake safetensors";
const MODEL_WEIGHTS: &[u8] = b"fake full model";
const TRAINER_STATE: &[u8] = br#"{"step":4}"#;

impl FakeTrainer {
    fn record(&self, job: &SftJob<'_>) {
        let resumed_state = job
            .resume_from
            .map(|dir| std::fs::read_to_string(dir.join("trainer_state.json")).unwrap());
        *self.seen.lock().unwrap() = Some(SeenJob {
            approach: job.approach.clone(),
            settings: job.settings.clone(),
            validation_examples: job.validation.map(|v| v.len()),
            has_checkpoint_dir: job.checkpoint_dir.is_some(),
            export_merged: job.export_merged,
            resumed_state,
        });
    }
}

/// Writes a checkpoint folder as the trainer lays it out for the job's approach.
fn write_checkpoint(job: &SftJob<'_>, step: u64) -> std::io::Result<PathBuf> {
    let dir = job
        .checkpoint_dir
        .expect("the worker passes a checkpoint folder")
        .join(format!("step-{step}"));
    std::fs::create_dir_all(&dir)?;
    match job.approach {
        Approach::Lora(_) => {
            std::fs::write(dir.join("adapter_config.json"), ADAPTER_CONFIG)?;
            std::fs::write(dir.join("adapter_model.safetensors"), ADAPTER_WEIGHTS)?;
        }
        Approach::Full => std::fs::write(dir.join("model.safetensors"), MODEL_WEIGHTS)?,
    }
    std::fs::write(dir.join("optimizer.safetensors"), b"moments")?;
    std::fs::write(dir.join("trainer_state.json"), TRAINER_STATE)?;
    Ok(dir)
}

/// Writes the final artifacts as the trainer lays them out for the job's approach.
fn write_artifacts(job: &SftJob<'_>) -> std::io::Result<Vec<(ArtifactKind, PathBuf)>> {
    match job.approach {
        Approach::Lora(_) => {
            let adapter = job.output_dir.join("adapter");
            std::fs::create_dir_all(&adapter)?;
            std::fs::write(adapter.join("adapter_config.json"), ADAPTER_CONFIG)?;
            std::fs::write(adapter.join("adapter_model.safetensors"), ADAPTER_WEIGHTS)?;
            let mut artifacts = vec![(ArtifactKind::Adapter, adapter)];
            if job.export_merged {
                let merged = job.output_dir.join("merged");
                std::fs::create_dir_all(&merged)?;
                std::fs::write(merged.join("config.json"), b"{}")?;
                std::fs::write(merged.join("model.safetensors"), MODEL_WEIGHTS)?;
                artifacts.push((ArtifactKind::Merged, merged));
            }
            Ok(artifacts)
        }
        Approach::Full => {
            let model = job.output_dir.join("model");
            std::fs::create_dir_all(&model)?;
            std::fs::write(model.join("config.json"), b"{}")?;
            std::fs::write(model.join("model.safetensors"), MODEL_WEIGHTS)?;
            Ok(vec![(ArtifactKind::Model, model)])
        }
    }
}

fn succeeded(steps: u64, artifacts: Vec<(ArtifactKind, PathBuf)>) -> RunOutcome {
    RunOutcome::Succeeded(TrainSummary {
        trained_tokens: steps * 32,
        steps,
        skipped_steps: 0,
        artifacts,
    })
}

impl Trainer for FakeTrainer {
    fn run_sft(
        &self,
        job: &SftJob<'_>,
        observer: &mut dyn TrainObserver,
    ) -> Result<RunOutcome, TrainError> {
        assert_eq!(
            job.examples.len(),
            2,
            "the worker passes the parsed dataset"
        );
        self.record(job);
        observer.on_event(
            studio_train::EventLevel::Info,
            &format!("Loaded base model {}", job.base_model_name),
        );
        match &self.behaviour {
            Behaviour::Succeed { steps } => {
                for step in 1..=*steps {
                    observer.on_step(&metrics(step, *steps));
                }
                Ok(succeeded(*steps, write_artifacts(job)?))
            }
            Behaviour::Checkpoint { steps, at } => {
                for step in 1..=*steps {
                    let mut step_metrics = metrics(step, *steps);
                    if at.contains(&step) {
                        step_metrics.valid_loss = Some(2.5);
                        step_metrics.valid_mean_token_accuracy = Some(0.625);
                    }
                    observer.on_step(&step_metrics);
                    if at.contains(&step) {
                        let dir = write_checkpoint(job, step)?;
                        observer.on_checkpoint(&CheckpointInfo {
                            step,
                            dir,
                            metrics: step_metrics,
                        });
                    }
                }
                Ok(succeeded(*steps, write_artifacts(job)?))
            }
            Behaviour::Fail => Err(TrainError::InvalidData {
                message: "every example is longer than max_seq_len 16".into(),
                param: Some("training_file".into()),
            }),
            Behaviour::RunUntilStopped { max_steps } => {
                for step in 1..=*max_steps {
                    observer.on_step(&metrics(step, *max_steps));
                    std::thread::sleep(Duration::from_millis(10));
                    if let Some(request) = observer.stop_request() {
                        if request == StopRequest::Suspend {
                            let dir = write_checkpoint(job, step)?;
                            let step_metrics = metrics(step, *max_steps);
                            observer.on_checkpoint(&CheckpointInfo {
                                step,
                                dir,
                                metrics: step_metrics,
                            });
                        }
                        return Ok(RunOutcome::Stopped { steps: step, request });
                    }
                }
                panic!("the run was never stopped");
            }
            Behaviour::CancelWhenStopped { store, job: cancelled } => {
                for step in 1..=2000 {
                    observer.on_step(&metrics(step, 2000));
                    std::thread::sleep(Duration::from_millis(10));
                    if let Some(request) = observer.stop_request() {
                        // The trainer runs on a blocking thread, which may block on the runtime.
                        tokio::runtime::Handle::current()
                            .block_on(store.request_cancel(cancelled))
                            .unwrap();
                        return Ok(RunOutcome::Stopped { steps: step, request });
                    }
                }
                panic!("the run was never stopped");
            }
        }
    }
}

fn metrics(step: u64, total_steps: u64) -> StepMetrics {
    StepMetrics {
        step,
        total_steps,
        epoch: step as f64 / total_steps as f64,
        train_loss: 3.0 / step as f64,
        train_mean_token_accuracy: 0.5,
        valid_loss: None,
        valid_mean_token_accuracy: None,
        learning_rate: 1e-4,
        grad_norm: 0.5,
        tokens_per_second: 1000.0,
        trained_tokens: step * 32,
    }
}

struct Setup {
    services: Services,
    settings: WorkerSettings,
    _dir: tempfile::TempDir,
}

async fn setup(pool: PgPool) -> Setup {
    setup_with_clock(pool, Arc::new(SystemClock)).await
}

async fn setup_with_clock(pool: PgPool, clock: Arc<dyn Clock>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::fs::write(dir.path().join("models/tiny.gguf"), b"GGUF").unwrap();
    let services = Services {
        store: Arc::new(PgStore::new(pool, clock)),
        artifacts: Arc::new(ArtifactStore::new(dir.path().join("artifacts"))),
        models: ModelCatalog::new(dir.path().join("models")),
    };
    let settings = WorkerSettings {
        worker_id: "test-worker".into(),
        scratch_dir: dir.path().join("scratch"),
        poll_interval: Duration::from_millis(20),
        lease: Duration::from_secs(30),
        heartbeat_interval: Duration::from_millis(20),
    };
    Setup {
        services,
        settings,
        _dir: dir,
    }
}

impl Setup {
    async fn queue_job(&self, model: &str) -> JobId {
        self.queue_job_with(json!({"model": model, "suffix": "demo"}))
            .await
    }

    /// Uploads a training file, adds it to `body` and queues the job.
    async fn queue_job_with(&self, mut body: serde_json::Value) -> JobId {
        let file = self.uploaded_file().await;
        body["training_file"] = json!(file.as_str());
        let spec = JobSpec::parse(&body, 5).unwrap();
        let job = NewJob {
            id: JobId::new(),
            spec,
            max_attempts: 3,
            idempotency_key: None,
            request_hash: None,
        };
        self.services.store.insert_job(&job).await.unwrap();
        job.id
    }

    async fn uploaded_file(&self) -> FileId {
        let file = FileId::new();
        self.services
            .artifacts
            .put_bytes(&file_key(&file), DATASET.as_bytes())
            .await
            .unwrap();
        let new_file = NewFile {
            id: file.clone(),
            filename: "train.jsonl".into(),
            purpose: "fine-tune".into(),
            bytes: DATASET.len() as u64,
            sha256: "0".repeat(64),
            format: DatasetFormat::Chat,
            line_count: 2,
            idempotency_key: None,
        };
        self.services.store.insert_file(&new_file).await.unwrap();
        file
    }

    fn worker(&self, behaviour: Behaviour) -> Worker {
        self.recording_worker(behaviour).0
    }

    /// Returns a worker and what its trainer is handed.
    fn recording_worker(&self, behaviour: Behaviour) -> (Worker, Arc<Mutex<Option<SeenJob>>>) {
        let seen = Arc::new(Mutex::new(None));
        let trainer = FakeTrainer {
            behaviour,
            seen: seen.clone(),
        };
        let worker = Worker::new(
            self.services.clone(),
            self.settings.clone(),
            Arc::new(trainer),
        );
        (worker, seen)
    }

    async fn event_messages(&self, id: &JobId) -> Vec<String> {
        let page = self
            .services
            .store
            .list_events(id, &PageRequest::first(100))
            .await
            .unwrap();
        page.data
            .into_iter()
            .rev()
            .map(|event| event.message)
            .collect()
    }
}

fn not_stopped() -> watch::Receiver<bool> {
    watch::channel(false).1
}

#[sqlx::test(migrations = "../../migrations")]
async fn queued_job_runs_to_success(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;

    let ran = setup
        .worker(Behaviour::Succeed { steps: 5 })
        .run_next_job(not_stopped())
        .await
        .unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();
    let metrics = setup.services.store.list_metrics(&id).await.unwrap();
    let weights = setup
        .services
        .artifacts
        .read(&final_adapter_key(&id, "adapter_model.safetensors"))
        .await
        .unwrap();
    let config = setup
        .services
        .artifacts
        .read(&final_adapter_key(&id, "adapter_config.json"))
        .await
        .unwrap();
    let events = setup.event_messages(&id).await;

    assert_eq!(ran, Some(id.clone()));
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.fine_tuned_model, Some(format!("ft:tiny:demo:{id}")));
    assert_eq!(job.trained_tokens, Some(160));
    assert_eq!(
        metrics.iter().map(|m| m.step).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(metrics[1].train_loss, 1.5);
    assert_eq!(weights, ADAPTER_WEIGHTS);
    assert_eq!(config, ADAPTER_CONFIG);
    assert!(
        events
            .first()
            .unwrap()
            .starts_with("Fine-tuning job started"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|m| m == "Loaded base model tiny"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|m| m.starts_with("Step 5/5: training loss=0.6000")),
        "{events:?}"
    );
    assert!(
        events
            .last()
            .unwrap()
            .starts_with("The job has successfully completed"),
        "{events:?}"
    );
    assert!(
        !setup.settings.scratch_dir.join(id.as_str()).exists(),
        "the scratch folder is removed"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn failing_trainer_fails_job_with_error_fields(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;

    setup
        .worker(Behaviour::Fail)
        .run_next_job(not_stopped())
        .await
        .unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();
    let error = job.error.clone().unwrap();

    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(error.code, "invalid_training_file");
    assert_eq!(error.message, "every example is longer than max_seq_len 16");
    assert_eq!(error.param.as_deref(), Some("training_file"));
    assert!(job.finished_at.is_some());
}

#[sqlx::test(migrations = "../../migrations")]
async fn unknown_model_fails_job_before_training(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("removed-model").await;

    setup
        .worker(Behaviour::Succeed { steps: 1 })
        .run_next_job(not_stopped())
        .await
        .unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();
    let error = job.error.unwrap();

    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(error.code, "model_not_found");
    assert_eq!(error.param.as_deref(), Some("model"));
    assert!(
        error.message.contains("available base models: tiny"),
        "{}",
        error.message
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_request_stops_the_run(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;
    let worker = setup.worker(Behaviour::RunUntilStopped { max_steps: 2000 });
    let store = setup.services.store.clone();
    let job_id = id.clone();

    let canceller = tokio::spawn(async move {
        let started = Instant::now();
        while store.list_metrics(&job_id).await.unwrap().len() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the run never wrote metrics"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.request_cancel(&job_id).await.unwrap();
    });
    worker.run_next_job(not_stopped()).await.unwrap();
    canceller.await.unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();
    let steps = setup.services.store.list_metrics(&id).await.unwrap().len();

    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(
        (3..2000).contains(&steps),
        "the run stopped early, after {steps} steps"
    );
    assert!(!setup
        .services
        .artifacts
        .exists(&final_adapter_key(&id, "adapter_model.safetensors"))
        .await
        .unwrap());
    assert_eq!(
        setup.event_messages(&id).await.last().unwrap(),
        "The job was cancelled"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn shutdown_requeues_running_job(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;
    let worker = setup.worker(Behaviour::RunUntilStopped { max_steps: 2000 });
    let (stop, stopped) = watch::channel(false);
    let store = setup.services.store.clone();
    let job_id = id.clone();

    let stopper = tokio::spawn(async move {
        while store.list_metrics(&job_id).await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
    });
    worker.run_next_job(stopped).await.unwrap();
    stopper.await.unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();

    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempt, 0);
    assert_eq!(job.locked_by, None);
    assert_last_step_is_checkpointed(&setup, &id).await;
}

/// Checks that the latest checkpoint is of the last step with metrics, so a resumed run
/// repeats no step.
async fn assert_last_step_is_checkpointed(setup: &Setup, id: &JobId) {
    let store = &setup.services.store;
    let last_step = store.list_metrics(id).await.unwrap().last().expect("metrics").step;
    let latest = store
        .list_checkpoints(id, &PageRequest::first(1))
        .await
        .unwrap();
    let checkpoint = latest.data.first().expect("a checkpoint written on stopping");
    assert_eq!(checkpoint.step, last_step);
    let files = setup
        .services
        .artifacts
        .list(&checkpoint.artifact_key)
        .await
        .unwrap();
    assert!(
        files.iter().any(|(name, _)| name == "trainer_state.json"),
        "{files:?}"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn pause_checkpoints_and_resume_continues_from_it(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;
    let worker = setup.worker(Behaviour::RunUntilStopped { max_steps: 2000 });
    let store = setup.services.store.clone();
    let job_id = id.clone();

    let pauser = tokio::spawn(async move {
        let started = Instant::now();
        while store.list_metrics(&job_id).await.unwrap().len() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the run never wrote metrics"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.request_pause(&job_id).await.unwrap();
    });
    worker.run_next_job(not_stopped()).await.unwrap();
    pauser.await.unwrap();
    let paused = setup.services.store.get_job(&id).await.unwrap();

    assert_eq!(paused.status, JobStatus::Paused);
    assert_eq!(paused.locked_by, None);
    assert_last_step_is_checkpointed(&setup, &id).await;
    assert!(
        setup
            .event_messages(&id)
            .await
            .last()
            .unwrap()
            .starts_with("The job was paused"),
        "{:?}",
        setup.event_messages(&id).await
    );

    // A paused job is not claimed until it is resumed; then it continues from the checkpoint.
    let (resumed_worker, seen) = setup.recording_worker(Behaviour::Succeed { steps: 6 });
    assert_eq!(resumed_worker.run_next_job(not_stopped()).await.unwrap(), None);
    setup.services.store.resume_job(&id).await.unwrap();
    assert_eq!(
        resumed_worker.run_next_job(not_stopped()).await.unwrap(),
        Some(id.clone())
    );
    let seen = seen.lock().unwrap().clone().expect("the trainer ran");
    assert_eq!(
        seen.resumed_state.as_deref(),
        Some(std::str::from_utf8(TRAINER_STATE).unwrap())
    );
    assert_eq!(
        setup.services.store.get_job(&id).await.unwrap().status,
        JobStatus::Succeeded
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_after_last_heartbeat_wins_over_release(pool: PgPool) {
    let mut setup = setup(pool).await;
    // No heartbeat comes after the claim, so the worker itself never learns of the cancel.
    setup.settings.heartbeat_interval = Duration::from_secs(3600);
    let id = setup.queue_job("tiny").await;
    let worker = setup.worker(Behaviour::CancelWhenStopped {
        store: setup.services.store.clone(),
        job: id.clone(),
    });
    // The worker is shutting down from the start, so the run stops after its first step.
    let (_stop, stopped) = watch::channel(true);

    worker.run_next_job(stopped).await.unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();
    let messages = setup.event_messages(&id).await;

    assert_eq!(job.status, JobStatus::Cancelled, "{messages:?}");
    assert!(job.finished_at.is_some());
    assert_eq!(job.locked_by, None);
    assert_eq!(
        messages.last().map(String::as_str),
        Some("The job was cancelled as requested"),
        "{messages:?}"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn run_stops_on_shutdown_when_idle(pool: PgPool) {
    let setup = setup(pool).await;
    let worker = setup.worker(Behaviour::Succeed { steps: 1 });

    let result = tokio::time::timeout(
        Duration::from_secs(5),
        worker.run(tokio::time::sleep(Duration::from_millis(50))),
    )
    .await;

    assert!(
        matches!(result, Ok(Ok(()))),
        "the worker stops within the timeout"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn checkpoint_is_uploaded_and_registered(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;

    setup
        .worker(Behaviour::Checkpoint {
            steps: 4,
            at: vec![2, 4],
        })
        .run_next_job(not_stopped())
        .await
        .unwrap();
    let store = &setup.services.store;
    let artifacts = &setup.services.artifacts;
    let checkpoints = store
        .list_checkpoints(&id, &PageRequest::first(10))
        .await
        .unwrap()
        .data;
    let uploaded = artifacts.list(&checkpoint_prefix(&id, 2)).await.unwrap();
    let metrics = store.list_metrics(&id).await.unwrap();

    assert_eq!(
        store.get_job(&id).await.unwrap().status,
        JobStatus::Succeeded
    );
    assert_eq!(
        checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(),
        [4, 2]
    );
    assert_eq!(checkpoints[1].artifact_key, checkpoint_prefix(&id, 2));
    assert_eq!(checkpoints[1].metrics["step"], 2);
    assert_eq!(checkpoints[1].metrics["train_loss"], 1.5);
    assert_eq!(checkpoints[1].metrics["train_mean_token_accuracy"], 0.5);
    assert_eq!(checkpoints[1].metrics["valid_loss"], 2.5);
    assert_eq!(
        checkpoints[1].metrics["full_valid_mean_token_accuracy"],
        0.625
    );
    let names: Vec<&str> = uploaded.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.safetensors",
            "trainer_state.json"
        ]
    );
    assert_eq!(metrics[1].valid_loss, Some(2.5));
    assert_eq!(metrics[1].valid_mean_token_accuracy, Some(0.625));
    assert_eq!(metrics[0].train_mean_token_accuracy, Some(0.5));
}

#[sqlx::test(migrations = "../../migrations")]
async fn evaluation_writes_metrics_event(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;

    setup
        .worker(Behaviour::Checkpoint {
            steps: 50,
            at: vec![7],
        })
        .run_next_job(not_stopped())
        .await
        .unwrap();
    let events = setup
        .services
        .store
        .list_events(&id, &PageRequest::first(100))
        .await
        .unwrap()
        .data;
    let evaluated = events
        .iter()
        .find(|e| e.data.as_ref().is_some_and(|d| d["step"] == 7))
        .expect("step 7 is evaluated, so it has a metrics event");
    let data = evaluated.data.as_ref().unwrap();

    assert_eq!(evaluated.event_type, studio_store::EventType::Metrics);
    assert_eq!(data["valid_loss"], 2.5);
    assert_eq!(data["valid_mean_token_accuracy"], 0.625);
    assert_eq!(data["train_mean_token_accuracy"], 0.5);
    assert_eq!(data["total_steps"], 50);
    assert!(
        evaluated.message.contains("validation loss=2.5000"),
        "{}",
        evaluated.message
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn reclaimed_job_resumes_from_latest_checkpoint(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;
    let store = &setup.services.store;
    store
        .claim_job("crashed-worker", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    for (step, state) in [(2, b"{\"step\":2}".as_slice()), (4, TRAINER_STATE)] {
        let prefix = checkpoint_prefix(&id, step);
        let artifacts = &setup.services.artifacts;
        artifacts
            .put_bytes(&format!("{prefix}/trainer_state.json"), state)
            .await
            .unwrap();
        artifacts
            .put_bytes(
                &format!("{prefix}/adapter_model.safetensors"),
                ADAPTER_WEIGHTS,
            )
            .await
            .unwrap();
        let checkpoint = NewCheckpoint {
            id: CheckpointId::new(),
            job_id: id.clone(),
            step,
            metrics: json!({"step": step}),
            artifact_key: prefix,
        };
        store
            .insert_checkpoint("crashed-worker", &checkpoint)
            .await
            .unwrap();
    }
    store.release_job(&id, "crashed-worker").await.unwrap();

    let (worker, seen) = setup.recording_worker(Behaviour::Succeed { steps: 6 });
    worker.run_next_job(not_stopped()).await.unwrap();
    let seen = seen.lock().unwrap().clone().expect("the trainer ran");
    let events = setup.event_messages(&id).await;

    assert_eq!(
        seen.resumed_state.as_deref(),
        Some(std::str::from_utf8(TRAINER_STATE).unwrap())
    );
    assert!(
        events.iter().any(|m| m == "Resuming from step 4"),
        "{events:?}"
    );
    assert_eq!(
        store.get_job(&id).await.unwrap().status,
        JobStatus::Succeeded
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn fresh_job_starts_without_resume(pool: PgPool) {
    let setup = setup(pool).await;
    setup.queue_job("tiny").await;

    let (worker, seen) = setup.recording_worker(Behaviour::Succeed { steps: 1 });
    worker.run_next_job(not_stopped()).await.unwrap();
    let seen = seen.lock().unwrap().clone().expect("the trainer ran");

    assert_eq!(seen.resumed_state, None);
    assert!(seen.has_checkpoint_dir);
    assert!(!seen.export_merged, "the API builds the merged model on demand");
    assert_eq!(seen.validation_examples, None);
    assert_eq!(seen.settings.n_checkpoints, 1);
}

#[sqlx::test(migrations = "../../migrations")]
async fn full_job_maps_through_and_stores_model(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup
        .queue_job_with(json!({
            "model": "tiny",
            "training_type": {"type": "full"},
            "hyperparameters": {"gradient_accumulation_steps": 2, "lr_scheduler": "cosine"},
        }))
        .await;

    let (worker, seen) = setup.recording_worker(Behaviour::Succeed { steps: 3 });
    worker.run_next_job(not_stopped()).await.unwrap();
    let seen = seen.lock().unwrap().clone().expect("the trainer ran");
    let artifacts = &setup.services.artifacts;
    let model = artifacts
        .list(&format!("jobs/{id}/final/model"))
        .await
        .unwrap();
    let adapter = artifacts
        .list(&format!("jobs/{id}/final/adapter"))
        .await
        .unwrap();

    assert_eq!(seen.approach, Approach::Full);
    assert_eq!(seen.settings.learning_rate, 2e-5);
    assert_eq!(seen.settings.gradient_accumulation_steps, 2);
    assert_eq!(seen.settings.lr_scheduler, studio_train::DecayKind::Cosine);
    assert_eq!(
        model,
        [
            ("config.json".to_owned(), 2),
            ("model.safetensors".to_owned(), MODEL_WEIGHTS.len() as u64)
        ]
    );
    assert!(adapter.is_empty());
    assert_eq!(
        setup.services.store.get_job(&id).await.unwrap().status,
        JobStatus::Succeeded
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn validation_file_is_passed_to_trainer(pool: PgPool) {
    let setup = setup(pool).await;
    let validation = setup.uploaded_file().await;
    let id = setup
        .queue_job_with(json!({"model": "tiny", "validation_file": validation.as_str()}))
        .await;

    let (worker, seen) = setup.recording_worker(Behaviour::Succeed { steps: 1 });
    worker.run_next_job(not_stopped()).await.unwrap();
    let seen = seen.lock().unwrap().clone().expect("the trainer ran");
    let events = setup.event_messages(&id).await;

    assert_eq!(seen.validation_examples, Some(2));
    assert!(
        events
            .iter()
            .any(|m| m == "Read 2 validation examples in the chat format"),
        "{events:?}"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn success_stores_adapter_and_results_csv_only(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup.queue_job("tiny").await;

    setup
        .worker(Behaviour::Succeed { steps: 2 })
        .run_next_job(not_stopped())
        .await
        .unwrap();
    let artifacts = &setup.services.artifacts;
    let merged = artifacts
        .list(&format!("jobs/{id}/final/merged"))
        .await
        .unwrap();
    let csv = String::from_utf8(artifacts.read(&results_csv_key(&id)).await.unwrap()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();

    assert_eq!(merged.len(), 0, "no merged model until a download asks for it");
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[0].starts_with("step,epoch,train_loss,train_mean_token_accuracy,valid_loss"),
        "{csv}"
    );
    assert!(lines[2].starts_with("2,1,1.5,0.5,,"), "{csv}");
}

/// A trainer that waits for `gate` before writing an adapter with these weights, so a test
/// can hold a run while its lease runs out.
struct GatedTrainer {
    gate: Mutex<std::sync::mpsc::Receiver<()>>,
    weights: &'static [u8],
}

impl Trainer for GatedTrainer {
    fn run_sft(
        &self,
        job: &SftJob<'_>,
        _observer: &mut dyn TrainObserver,
    ) -> Result<RunOutcome, TrainError> {
        self.gate.lock().unwrap().recv().unwrap();
        let adapter = job.output_dir.join("adapter");
        std::fs::create_dir_all(&adapter)?;
        std::fs::write(adapter.join("adapter_config.json"), ADAPTER_CONFIG)?;
        std::fs::write(adapter.join("adapter_model.safetensors"), self.weights)?;
        Ok(succeeded(1, vec![(ArtifactKind::Adapter, adapter)]))
    }
}

/// Returns a store clock that tests move by hand, starting at the current wall-clock time.
fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemClock.now()))
}

/// Runs the next job after the retry delay of a rescued job has passed: the first round
/// rescues the job and finds it not yet due.
async fn run_after_retry_delay(worker: &Worker, clock: &ManualClock) -> Option<JobId> {
    assert_eq!(worker.run_next_job(not_stopped()).await.unwrap(), None);
    clock.advance(TimeDelta::from_std(RETRY_MAX_DELAY).unwrap());
    worker.run_next_job(not_stopped()).await.unwrap()
}

#[sqlx::test(migrations = "../../migrations")]
async fn worker_past_its_lease_keeps_the_new_result(pool: PgPool) {
    let clock = manual_clock();
    let setup = setup_with_clock(pool, clock.clone()).await;
    let id = setup.queue_job("tiny").await;
    // The stale worker never heartbeats, as if its heartbeats failed while it trained on.
    let stale_settings = WorkerSettings {
        worker_id: "stale-worker".into(),
        lease: Duration::from_millis(100),
        heartbeat_interval: Duration::from_secs(3600),
        ..setup.settings.clone()
    };
    let (open_gate, gate) = std::sync::mpsc::channel();
    let stale = Worker::new(
        setup.services.clone(),
        stale_settings,
        Arc::new(GatedTrainer {
            gate: Mutex::new(gate),
            weights: b"stale weights",
        }),
    );
    let stale_run = tokio::spawn(async move { stale.run_next_job(not_stopped()).await });
    while setup.services.store.get_job(&id).await.unwrap().status != JobStatus::Running {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    clock.advance(TimeDelta::milliseconds(200));

    let rescuer =
        run_after_retry_delay(&setup.worker(Behaviour::Succeed { steps: 2 }), &clock).await;
    open_gate.send(()).unwrap();
    let _ = stale_run.await.unwrap();

    let job = setup.services.store.get_job(&id).await.unwrap();
    let weights = setup
        .services
        .artifacts
        .read(&final_adapter_key(&id, "adapter_model.safetensors"))
        .await
        .unwrap();
    assert_eq!(rescuer, Some(id.clone()));
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(job.attempt, 2);
    assert_eq!(
        weights, ADAPTER_WEIGHTS,
        "the stale worker overwrote the adapter"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn rescue_writes_job_event(pool: PgPool) {
    let clock = manual_clock();
    let setup = setup_with_clock(pool, clock.clone()).await;
    let id = setup.queue_job("tiny").await;
    let store = &setup.services.store;
    store
        .claim_job("crashed-worker", Duration::from_millis(1))
        .await
        .unwrap();
    clock.advance(TimeDelta::milliseconds(20));

    let ran = run_after_retry_delay(&setup.worker(Behaviour::Succeed { steps: 2 }), &clock).await;
    assert_eq!(ran, Some(id.clone()));
    let events = setup.event_messages(&id).await;

    let rescue = events
        .iter()
        .position(|m| m.starts_with("The worker stopped sending heartbeats; the job goes back"));
    let restart = events
        .iter()
        .position(|m| m == "Fine-tuning job started (attempt 2 of 3)");
    assert!(rescue.is_some(), "{events:?}");
    assert!(rescue < restart, "{events:?}");
}

/// What a distillation run is handed.
#[derive(Clone, Debug)]
struct SeenDistillation {
    teacher_path: PathBuf,
    teacher_name: String,
    distill: studio_train::DistillSettings,
    approach: Approach,
    examples: usize,
}

/// Records the distillation job and succeeds with a full model folder.
struct DistillTrainer {
    seen: Arc<Mutex<Option<SeenDistillation>>>,
}

impl Trainer for DistillTrainer {
    fn run_sft(&self, _job: &SftJob<'_>, _observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        panic!("a distillation job must not run as a supervised one");
    }

    fn run_distillation(&self, job: &studio_train::DistillJob<'_>, observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        *self.seen.lock().unwrap() = Some(SeenDistillation {
            teacher_path: job.teacher_path.to_path_buf(),
            teacher_name: job.teacher_name.to_string(),
            distill: job.distill.clone(),
            approach: job.sft.approach.clone(),
            examples: job.sft.examples.len(),
        });
        observer.on_step(&metrics(1, 1));
        Ok(succeeded(1, write_artifacts(&job.sft)?))
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn distillation_job_runs_the_distillation_trainer(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup
        .queue_job_with(json!({
            "model": "tiny",
            "training_type": {"type": "full"},
            "method": {"type": "distillation", "distillation": {
                "teacher_model": "tiny", "student_layers": [0, 1],
                "hyperparameters": {"temperature": 3, "kd_weight": 0.25}}},
        }))
        .await;
    let seen = Arc::new(Mutex::new(None));
    let trainer = DistillTrainer { seen: seen.clone() };
    let worker = Worker::new(setup.services.clone(), setup.settings.clone(), Arc::new(trainer));

    worker.run_next_job(not_stopped()).await.unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();
    let seen = seen.lock().unwrap().clone().expect("the distillation trainer ran");

    assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
    assert_eq!(seen.teacher_name, "tiny");
    assert!(seen.teacher_path.ends_with("models/tiny.gguf"), "{}", seen.teacher_path.display());
    assert_eq!(seen.distill.temperature, 3.0);
    assert_eq!(seen.distill.kd_weight, 0.25);
    assert_eq!(seen.distill.student_layers, Some(vec![0, 1]));
    assert_eq!(seen.approach, Approach::Full);
    assert_eq!(seen.examples, 2);
}

#[sqlx::test(migrations = "../../migrations")]
async fn distillation_with_unknown_teacher_fails_before_training(pool: PgPool) {
    let setup = setup(pool).await;
    let id = setup
        .queue_job_with(json!({
            "model": "tiny",
            "method": {"type": "distillation", "distillation": {"teacher_model": "no-such-teacher"}},
        }))
        .await;
    let seen = Arc::new(Mutex::new(None));
    let worker = Worker::new(setup.services.clone(), setup.settings.clone(), Arc::new(DistillTrainer { seen: seen.clone() }));

    worker.run_next_job(not_stopped()).await.unwrap();
    let job = setup.services.store.get_job(&id).await.unwrap();
    let error = job.error.expect("the job failed");

    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(error.code, "model_not_found");
    assert_eq!(error.param.as_deref(), Some("method.distillation.teacher_model"));
    assert!(error.message.contains("no-such-teacher"), "{}", error.message);
    assert!(seen.lock().unwrap().is_none(), "the trainer must not run");
}

/// Records the conversations a distillation run trains on.
struct ExamplesTrainer {
    seen: Arc<Mutex<Vec<studio_core::dataset::Conversation>>>,
}

impl Trainer for ExamplesTrainer {
    fn run_sft(&self, _job: &SftJob<'_>, _observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        panic!("a distillation job must not run as a supervised one");
    }

    fn run_distillation(&self, job: &studio_train::DistillJob<'_>, _observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        *self.seen.lock().unwrap() = job.sft.examples.to_vec();
        Ok(succeeded(1, write_artifacts(&job.sft)?))
    }
}

/// Queues a distillation job of the tiny model `tiny-hf` (2 layers) on a prompts-only file, and
/// returns a worker whose trainer records the conversations it receives in `seen`.
async fn queue_prompts_distillation(
    setup: &Setup,
    prompts: &str,
    max_seq_len: u32,
    student_layers: Option<&[u32]>,
) -> (NewJob, Worker, Arc<Mutex<Vec<studio_core::dataset::Conversation>>>) {
    let models = setup.services.models.dir().to_path_buf();
    studio_train::tiny::write_tiny_model_folder(&models.join("tiny-hf"), "llama", 3).unwrap();
    let file = FileId::new();
    setup.services.artifacts.put_bytes(&file_key(&file), prompts.as_bytes()).await.unwrap();
    let new_file = NewFile {
        id: file.clone(),
        filename: "prompts.jsonl".into(),
        purpose: "fine-tune".into(),
        bytes: prompts.len() as u64,
        sha256: "0".repeat(64),
        format: DatasetFormat::Prompts,
        line_count: prompts.lines().count() as u64,
        idempotency_key: None,
    };
    setup.services.store.insert_file(&new_file).await.unwrap();
    let mut body = json!({
        "model": "tiny-hf", "training_file": file.as_str(), "training_type": {"type": "full"},
        "method": {"type": "distillation", "distillation": {"teacher_model": "tiny-hf",
            "hyperparameters": {"max_seq_len": max_seq_len}}},
    });
    if let Some(layers) = student_layers {
        body["method"]["distillation"]["student_layers"] = json!(layers);
    }
    let job = NewJob { id: JobId::new(), spec: JobSpec::parse(&body, 5).unwrap(), max_attempts: 3, idempotency_key: None, request_hash: None };
    setup.services.store.insert_job(&job).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::new(setup.services.clone(), setup.settings.clone(), Arc::new(ExamplesTrainer { seen: seen.clone() }));
    (job, worker, seen)
}

#[sqlx::test(migrations = "../../migrations")]
async fn prompts_only_distillation_stores_teacher_replies(pool: PgPool) {
    use studio_core::dataset::Role;

    let setup = setup(pool).await;
    let prompts = concat!(
        r#"{"prompt": "Hi"}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "Name a colour"}]}"#,
        "\n",
    );
    let (job, worker, seen) = queue_prompts_distillation(&setup, prompts, 16, None).await;

    worker.run_next_job(not_stopped()).await.unwrap();
    let record = setup.services.store.get_job(&job.id).await.unwrap();
    let examples = seen.lock().unwrap().clone();
    let events = setup.event_messages(&job.id).await;
    let stored = events
        .iter()
        .find_map(|message| message.strip_prefix("The teacher's replies are in file "))
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no event names the replies file: {events:?}"));
    let stored = FileId::parse(stored).unwrap();
    let content = setup.services.artifacts.read(&file_key(&stored)).await.unwrap();
    let content = String::from_utf8(content.to_vec()).unwrap();
    let record_file = setup.services.store.get_file(&stored).await.unwrap();

    assert_eq!(record.status, JobStatus::Succeeded, "{:?}", record.error);
    assert_eq!(examples.len(), 2);
    assert!(examples.iter().all(|c| c.messages.last().unwrap().role == Role::Assistant), "{examples:?}");
    assert_eq!(examples[0].messages[0].content, "Hi");
    assert_eq!(content.lines().count(), 2);
    assert!(content.lines().all(|line| line.contains(r#""role":"assistant""#)), "{content}");
    assert_eq!(record_file.format, DatasetFormat::Chat);
    assert_eq!(record_file.purpose, "fine-tune");
    assert_eq!(record_file.bytes, content.len() as u64);
}

#[sqlx::test(migrations = "../../migrations")]
async fn bad_student_layers_fail_before_teacher_replies(pool: PgPool) {
    let setup = setup(pool).await;
    let prompts = concat!(r#"{"prompt": "Hi"}"#, "\n");
    let (job, worker, seen) = queue_prompts_distillation(&setup, prompts, 16, Some(&[0, 5])).await;

    worker.run_next_job(not_stopped()).await.unwrap();
    let record = setup.services.store.get_job(&job.id).await.unwrap();
    let events = setup.event_messages(&job.id).await;

    assert_eq!(record.status, JobStatus::Failed);
    let error = record.error.expect("a failed job keeps its error");
    assert_eq!(error.param.as_deref(), Some("method.distillation.student_layers"));
    assert!(error.message.contains('5'), "{}", error.message);
    assert!(seen.lock().unwrap().is_empty(), "the student trained");
    assert!(
        !events.iter().any(|message| message.starts_with("The teacher is writing replies")),
        "the teacher started before the check: {events:?}"
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn cancel_stops_the_teacher_replies(pool: PgPool) {
    let setup = setup(pool).await;
    // Enough prompts that the teacher is still writing when the cancel arrives.
    let prompts: String = (0..2000).map(|i| format!("{{\"prompt\": \"Count to {i}\"}}\n")).collect();
    let (job, worker, seen) = queue_prompts_distillation(&setup, &prompts, 64, None).await;
    let store = setup.services.store.clone();
    let job_id = job.id.clone();
    let canceller = tokio::spawn(async move {
        let started = Instant::now();
        loop {
            let events = store.list_events(&job_id, &PageRequest::first(100)).await.unwrap();
            if events.data.iter().any(|event| event.message.starts_with("The teacher is writing replies")) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the teacher never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store.request_cancel(&job_id).await.unwrap();
    });

    worker.run_next_job(not_stopped()).await.unwrap();
    canceller.await.unwrap();
    let record = setup.services.store.get_job(&job.id).await.unwrap();
    let events = setup.event_messages(&job.id).await;

    assert_eq!(record.status, JobStatus::Cancelled);
    assert!(seen.lock().unwrap().is_empty(), "the student trained after the cancel");
    assert!(
        !events.iter().any(|message| message.starts_with("The teacher's replies are in file")),
        "the replies were stored after the cancel: {events:?}"
    );
    assert!(
        events.iter().any(|message| message.starts_with("The teacher stopped before writing every reply")),
        "{events:?}"
    );
}

/// Two preference pairs in the `{prompt, chosen, rejected}` format.
const PREFERENCES: &str = concat!(
    r#"{"prompt":"Hi","chosen":"Hello!","rejected":"Go away."}"#,
    "\n",
    r#"{"prompt":"Bye","chosen":"Goodbye!","rejected":"Whatever."}"#,
    "\n"
);

/// What the worker handed the DPO trainer: beta, the number of training and validation pairs,
/// and `max_seq_len`.
type SeenDpo = (f64, usize, Option<usize>, usize);

/// Records the DPO job, reports one step with rewards and succeeds with an adapter.
struct DpoTrainer {
    seen: Arc<Mutex<Option<SeenDpo>>>,
}

impl Trainer for DpoTrainer {
    fn run_sft(&self, _job: &SftJob<'_>, _observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        panic!("a DPO job must not run as a supervised one");
    }

    fn run_dpo(&self, job: &studio_train::DpoJob<'_>, observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
        let validation = job.validation.map(<[_]>::len);
        *self.seen.lock().unwrap() = Some((job.beta, job.pairs.len(), validation, job.settings.max_seq_len));
        let rewards = studio_train::PreferenceMetrics {
            reward_chosen: 0.5,
            reward_rejected: -0.25,
            reward_accuracy: 1.0,
            reward_margin: 0.75,
        };
        observer.on_preference_step(&metrics(1, 1), &rewards);
        let sft = SftJob {
            model_path: job.model_path,
            base_model_name: job.base_model_name,
            examples: &[],
            validation: None,
            approach: job.approach.clone(),
            settings: job.settings.clone(),
            output_dir: job.output_dir,
            checkpoint_dir: job.checkpoint_dir,
            resume_from: job.resume_from,
            export_merged: job.export_merged,
        };
        Ok(succeeded(1, write_artifacts(&sft)?))
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn dpo_job_runs_the_dpo_trainer_and_stores_rewards(pool: PgPool) {
    let setup = setup(pool).await;
    let artifacts = &setup.services.artifacts;
    let mut files = Vec::new();
    for text in [PREFERENCES, PREFERENCES.lines().next().unwrap()] {
        let file = FileId::new();
        artifacts.put_bytes(&file_key(&file), text.as_bytes()).await.unwrap();
        let new_file = NewFile {
            id: file.clone(),
            filename: "pairs.jsonl".into(),
            purpose: "fine-tune".into(),
            bytes: text.len() as u64,
            sha256: "0".repeat(64),
            format: DatasetFormat::Preference,
            line_count: text.lines().count() as u64,
            idempotency_key: None,
        };
        setup.services.store.insert_file(&new_file).await.unwrap();
        files.push(file);
    }
    let body = json!({
        "model": "tiny",
        "training_file": files[0].as_str(),
        "validation_file": files[1].as_str(),
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "max_seq_len": 64}}},
    });
    let job = NewJob {
        id: JobId::new(),
        spec: JobSpec::parse(&body, 5).unwrap(),
        max_attempts: 3,
        idempotency_key: None,
        request_hash: None,
    };
    setup.services.store.insert_job(&job).await.unwrap();
    let seen = Arc::new(Mutex::new(None));
    let trainer = DpoTrainer { seen: seen.clone() };
    let worker = Worker::new(setup.services.clone(), setup.settings.clone(), Arc::new(trainer));

    worker.run_next_job(not_stopped()).await.unwrap();
    let stored = setup.services.store.get_job(&job.id).await.unwrap();
    let points = setup.services.store.list_metrics(&job.id).await.unwrap();
    let csv = String::from_utf8(artifacts.read(&results_csv_key(&job.id)).await.unwrap()).unwrap();
    let lines: Vec<&str> = csv.lines().collect();

    assert_eq!(stored.status, JobStatus::Succeeded, "{:?}", stored.error);
    assert_eq!(*seen.lock().unwrap(), Some((0.2, 2, Some(1), 64)));
    let rewards = points[0].rewards.expect("the step's rewards are stored");
    assert_eq!(rewards.reward_chosen, 0.5);
    assert_eq!(rewards.reward_rejected, -0.25);
    assert_eq!(rewards.reward_accuracy, 1.0);
    assert_eq!(rewards.reward_margin, 0.75);
    assert!(lines[0].ends_with(",reward_chosen,reward_rejected,reward_accuracy,reward_margin"), "{csv}");
    assert!(lines[1].ends_with(",0.5,-0.25,1,0.75"), "{csv}");
}
