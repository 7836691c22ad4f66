//! The two long-running parts that `serve`, `worker`, `up` and `demo` combine: the REST API
//! server and a worker, each stopped by a cancellation token.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use studio_store::Services;
use studio_worker::WorkerSettings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::WorkerArgs;
use crate::config::Config;

/// Binds the API's listening socket, so that a port in use fails before anything else starts.
pub async fn bind_api(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("failed to listen on {addr}: pick another --port (STUDIO_PORT) or stop the process that uses it")
    })
}

/// Serves the REST API on `listener` until `shutdown` is cancelled, then lets open requests
/// finish.
pub async fn serve_api(
    listener: TcpListener,
    services: Services,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("failed to read the listening address")?;
    tracing::info!(%addr, "REST API listening");

    // Open event streams end when `shutdown` is cancelled, so the graceful shutdown below
    // waits only for requests that finish by themselves.
    axum::serve(listener, studio_api::app_with_shutdown(services, shutdown.clone()))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("the REST API server failed")?;

    tracing::info!("REST API stopped");
    Ok(())
}

/// Runs one worker until `shutdown` is cancelled.
pub async fn run_worker(
    services: Services,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let worker_id = settings.worker_id.clone();
    tracing::info!(%worker_id, "worker started");

    studio_worker::run_worker(services, settings, shutdown.cancelled_owned())
        .await
        .with_context(|| format!("worker {worker_id} failed"))?;

    tracing::info!(%worker_id, "worker stopped");
    Ok(())
}

/// Validates the worker options and fills in their defaults.
pub fn worker_settings(config: &Config, args: &WorkerArgs) -> anyhow::Result<WorkerSettings> {
    let poll_interval = seconds(args.poll_interval, "--poll-interval")?;
    let lease = seconds(args.lease, "--lease")?;
    let heartbeat_interval = seconds(args.heartbeat_interval, "--heartbeat-interval")?;
    if heartbeat_interval >= lease {
        bail!(
            "--heartbeat-interval {} s must be shorter than --lease {} s, \
             or the lease expires between heartbeats",
            args.heartbeat_interval,
            args.lease
        );
    }

    let worker_id = match &args.worker_id {
        Some(id) if id.trim().is_empty() => bail!("--worker-id (STUDIO_WORKER_ID) is empty: pass a name or leave it unset"),
        Some(id) => id.clone(),
        None => default_worker_id(),
    };
    let scratch_dir: PathBuf = args
        .scratch_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("scratch"));
    std::fs::create_dir_all(&scratch_dir).with_context(|| {
        format!("failed to create the scratch folder {}", scratch_dir.display())
    })?;

    Ok(WorkerSettings {
        worker_id,
        scratch_dir,
        poll_interval,
        lease,
        heartbeat_interval,
    })
}

fn seconds(value: f64, option: &str) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{option} {value} is invalid: pass a positive number of seconds");
    }
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{option} {value} is out of range: pass a number of seconds"))
}

fn default_worker_id() -> String {
    let hostname = gethostname::gethostname();
    format!("{}-{}", hostname.to_string_lossy(), std::process::id())
}

/// Opens the database pool, the artifact store and the model catalog.
pub async fn open_services(config: &Config) -> anyhow::Result<Services> {
    if !config.models_dir.is_dir() {
        tracing::warn!(
            models_dir = %config.models_dir.display(),
            "the models folder does not exist, so no base model is available: run `smart-studio fetch-model` or set --models-dir"
        );
    }

    let settings = config.store_settings()?;
    Services::open(&settings).await.with_context(|| {
        format!(
            "failed to open storage (database {}, artifacts {})",
            config.database_url(),
            config.artifacts()
        )
    })
}

/// Applies the database migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let url = config.database_url();
    studio_store::migrate(url.expose())
        .await
        .with_context(|| format!("failed to migrate the database {url}"))?;
    tracing::info!(database_url = %url, "database migrated");
    Ok(())
}

/// Spawns `task` and cancels `shutdown` when it ends, for a signal or an error, so that the
/// other parts of the process stop too.
pub fn spawn_until_stopped(
    task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    shutdown: CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let result = task.await;
        shutdown.cancel();
        result
    })
}

/// Waits for the API and the worker, and returns the first error of the two.
pub async fn join_all(
    api: JoinHandle<anyhow::Result<()>>,
    worker: JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let (api, worker) = tokio::join!(api, worker);
    let api = api.context("the REST API task panicked")?;
    let worker = worker.context("the worker task panicked")?;
    api.and(worker)
}
