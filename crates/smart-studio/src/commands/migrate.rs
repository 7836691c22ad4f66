//! `smart-studio migrate`: apply the database migrations and exit.

use crate::config::Config;
use crate::processes;

pub async fn run(config: &Config) -> anyhow::Result<()> {
    processes::migrate(config).await
}
