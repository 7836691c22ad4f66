//! `smart-studio up`: migrations, the REST API and one worker in a single process.

use crate::cli::WorkerArgs;
use crate::config::Config;
use crate::{processes, shutdown};

pub async fn run(config: &Config, args: &WorkerArgs) -> anyhow::Result<()> {
    let settings = processes::worker_settings(config, args)?;
    let listener = processes::bind_api(config.listen_addr).await?;
    processes::migrate(config).await?;
    let services = processes::open_services(config).await?;

    let shutdown = shutdown::on_signal();
    let api = processes::spawn_until_stopped(
        processes::serve_api(listener, services.clone(), shutdown.clone()),
        shutdown.clone(),
    );
    let worker = processes::spawn_until_stopped(
        processes::run_worker(services, settings, shutdown.clone()),
        shutdown,
    );

    processes::join_all(api, worker).await
}
