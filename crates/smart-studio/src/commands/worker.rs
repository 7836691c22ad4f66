//! `smart-studio worker`: one worker alone, for deployments that scale workers apart from the API.

use crate::cli::WorkerArgs;
use crate::config::Config;
use crate::{processes, shutdown};

pub async fn run(config: &Config, args: &WorkerArgs) -> anyhow::Result<()> {
    let settings = processes::worker_settings(config, args)?;
    let services = processes::open_services(config).await?;

    processes::run_worker(services, settings, shutdown::on_signal()).await
}
