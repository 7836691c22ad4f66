//! `smart-studio serve`: the REST API alone.

use crate::config::Config;
use crate::{processes, shutdown};

pub async fn run(config: &Config) -> anyhow::Result<()> {
    let listener = processes::bind_api(config.listen_addr).await?;
    let services = processes::open_services(config).await?;

    processes::serve_api(listener, services, shutdown::on_signal()).await
}
