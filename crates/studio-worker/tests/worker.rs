//! The worker with a fake trainer against a real Postgres.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;
use studio_core::dataset::DatasetFormat;
use studio_core::{FileId, JobId, JobSpec, JobStatus};
use studio_store::keys::{file_key, final_adapter_key};
use studio_store::{
    ArtifactStore, ModelCatalog, NewFile, NewJob, PageRequest, PgStore, Services, SystemClock,
};
use studio_train::{ArtifactKind, RunOutcome, SftJob, StepMetrics, TrainError, TrainObserver, TrainSummary};
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
    /// Reports this many steps and writes a small adapter.
    Succeed {
        steps: u64,
    },
    Fail,
    /// Reports a step every few milliseconds until cancelled, for at most this many steps.
    RunUntilCancelled {
        max_steps: u64,
    },
}

struct FakeTrainer(Behaviour);

const ADAPTER_CONFIG: &[u8] = br#"{"peft_type":"LORA"}"#;
const ADAPTER_WEIGHTS: &[u8] = b"fake safetensors";

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
        observer.on_event(
            studio_train::EventLevel::Info,
            &format!("Loaded base model {}", job.base_model_name),
        );
        match self.0 {
            Behaviour::Succeed { steps } => {
                for step in 1..=steps {
                    observer.on_step(&metrics(step, steps));
                }
                let adapter = job.output_dir.join("adapter");
                std::fs::create_dir_all(&adapter)?;
                std::fs::write(adapter.join("adapter_config.json"), ADAPTER_CONFIG)?;
                std::fs::write(adapter.join("adapter_model.safetensors"), ADAPTER_WEIGHTS)?;
                Ok(RunOutcome::Succeeded(TrainSummary {
                    trained_tokens: steps * 32,
                    steps,
                    skipped_steps: 0,
                    artifacts: vec![(ArtifactKind::Adapter, adapter)],
                }))
            }
            Behaviour::Fail => Err(TrainError::InvalidData {
                message: "every example is longer than max_seq_len 16".into(),
                param: Some("training_file".into()),
            }),
            Behaviour::RunUntilCancelled { max_steps } => {
                for step in 1..=max_steps {
                    if observer.should_cancel() {
                        return Ok(RunOutcome::Cancelled { steps: step - 1 });
                    }
                    observer.on_step(&metrics(step, max_steps));
                    std::thread::sleep(Duration::from_millis(10));
                }
                panic!("the run was never cancelled");
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
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::fs::write(dir.path().join("models/tiny.gguf"), b"GGUF").unwrap();
    let services = Services {
        store: Arc::new(PgStore::new(pool, Arc::new(SystemClock))),
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
        };
        self.services.store.insert_file(&new_file).await.unwrap();
        let spec = JobSpec::parse(
            &json!({"model": model, "training_file": file.as_str(), "suffix": "demo"}),
            5,
        )
        .unwrap();
        let job = NewJob {
            id: JobId::new(),
            spec,
            max_attempts: 3,
        };
        self.services.store.insert_job(&job).await.unwrap();
        job.id
    }

    fn worker(&self, behaviour: Behaviour) -> Worker {
        Worker::new(
            self.services.clone(),
            self.settings.clone(),
            Arc::new(FakeTrainer(behaviour)),
        )
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
    let worker = setup.worker(Behaviour::RunUntilCancelled { max_steps: 2000 });
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
    let worker = setup.worker(Behaviour::RunUntilCancelled { max_steps: 2000 });
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
