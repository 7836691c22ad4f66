//! `smart-studio`: the Smart Studio command line. This file only wires the parsed command line
//! to the command modules.

mod cli;
mod commands;
mod config;
mod processes;
mod shutdown;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();

    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_args(&cli.global, &cli.command)?;
    telemetry::init(&config.log_filter);

    match cli.command {
        Command::Serve => commands::serve::run(&config).await,
        Command::Worker(args) => commands::worker::run(&config, &args).await,
        Command::Up(args) => commands::up::run(&config, &args).await,
        Command::Migrate => commands::migrate::run(&config).await,
        Command::FetchModel => commands::fetch_model::run(&config).await,
        Command::Demo(args) => commands::demo::run(&config, &args).await,
        Command::Train(args) => commands::train::run(&config, &args).await,
        Command::Eval(args) => commands::eval::run(&config, &args).await,
        Command::Chat(args) => commands::chat::run(&config, &args).await,
    }
}
