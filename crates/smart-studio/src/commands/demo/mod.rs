//! `smart-studio demo`: the whole product in one command. It fetches the demo model, starts the
//! REST API and a worker in this process, fine-tunes a LoRA adapter on the bundled example
//! dataset through the API, as any client would, and extracts the adapter under the data folder.

mod client;
mod progress;
mod report;

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::Url;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use self::client::StudioClient;
use crate::cli::{DemoArgs, WorkerArgs};
use crate::commands::fetch_model::{ensure_demo_model, DEMO_MODEL};
use crate::config::Config;
use crate::{processes, shutdown};

/// The bundled dataset; embedded so that the binary needs no files besides the model.
const EXAMPLE_DATASET: &str = include_str!("../../../../../examples/sft_selfinstruct_short.jsonl");
const EXAMPLE_FILENAME: &str = "sft_selfinstruct_short.jsonl";
const ADAPTER_FOLDER: &str = "demo-adapter";

pub async fn run(config: &Config, args: &DemoArgs) -> anyhow::Result<()> {
    let worker_settings = processes::worker_settings(config, &demo_worker_args())?;
    let listener = processes::bind_api(config.listen_addr).await?;
    ensure_demo_model(&config.models_dir).await?;
    processes::migrate(config).await?;
    let services = processes::open_services(config).await?;

    let interrupt = shutdown::on_signal();
    let stopped = CancellationToken::new();
    let api = processes::spawn_until_stopped(
        processes::serve_api(listener, services.clone(), stopped.clone()),
        stopped.clone(),
    );
    let worker = processes::spawn_until_stopped(
        processes::run_worker(services, worker_settings, stopped.clone()),
        stopped.clone(),
    );

    let outcome = fine_tune(config, args, &interrupt, &stopped).await;
    stopped.cancel();
    // An API or worker error explains a failed demo better than the client's view of it.
    processes::join_all(api, worker).await?;
    outcome
}

async fn fine_tune(
    config: &Config,
    args: &DemoArgs,
    interrupt: &CancellationToken,
    stopped: &CancellationToken,
) -> anyhow::Result<()> {
    let client = StudioClient::new(base_url(config.listen_addr)?)?;
    client.wait_until_healthy(Duration::from_secs(30)).await?;

    let file = client
        .upload_file(EXAMPLE_FILENAME, EXAMPLE_DATASET.as_bytes().to_vec())
        .await?;
    println!("Uploaded {EXAMPLE_FILENAME} as {}", file.id);

    let job = client.create_job(&job_request(&file.id, args)).await?;
    println!(
        "Created job {} (LoRA r={} alpha={} on {DEMO_MODEL}, {} {}, batch size {})",
        job.id,
        args.r,
        args.alpha,
        args.n_epochs,
        if args.n_epochs == 1 { "epoch" } else { "epochs" },
        args.batch_size
    );

    let estimated_steps = estimated_steps(args);
    let job = progress::watch_job(&client, &job.id, estimated_steps, interrupt, stopped).await?;
    let metrics = client.metrics(&job.id).await?;
    report::print_loss_curve(&metrics);

    let archive = client.download_adapter(&job.id).await?;
    let adapter_dir = config.data_dir.join(ADAPTER_FOLDER);
    extract_adapter(&archive, &adapter_dir)?;
    report::print_summary(&job, &adapter_dir, client.base_url());
    Ok(())
}

fn job_request(file_id: &str, args: &DemoArgs) -> serde_json::Value {
    json!({
        "model": DEMO_MODEL,
        "training_file": file_id,
        "suffix": "demo",
        "seed": 42,
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": args.n_epochs,
                    "batch_size": args.batch_size,
                    "learning_rate": args.learning_rate,
                    "max_seq_len": args.max_seq_len,
                }
            }
        },
        "training_type": { "type": "lora", "r": args.r, "alpha": args.alpha },
    })
}

/// Estimates the optimizer steps of the demo job. It assumes that the trainer keeps every example
/// and runs a partial last batch. The progress bar grows if the job runs more steps.
fn estimated_steps(args: &DemoArgs) -> u64 {
    let examples = EXAMPLE_DATASET.lines().filter(|line| !line.trim().is_empty()).count() as u64;
    let batch_size = u64::from(args.batch_size.max(1));
    examples.div_ceil(batch_size) * u64::from(args.n_epochs)
}

fn demo_worker_args() -> WorkerArgs {
    WorkerArgs {
        worker_id: None,
        poll_interval: 0.5,
        lease: 60.0,
        heartbeat_interval: 10.0,
        scratch_dir: None,
    }
}

/// Builds the URL a client on this machine uses to reach `addr`. A server bound to the
/// unspecified address (0.0.0.0) also listens on loopback, so the client uses 127.0.0.1.
fn base_url(addr: SocketAddr) -> anyhow::Result<Url> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Url::parse(&format!("http://{addr}/")).with_context(|| format!("invalid API address {addr}"))
}

/// Unpacks the adapter tar into `target`, replacing an adapter left by an earlier demo. The
/// archive is unpacked into a sibling temporary folder first, so a failed download never
/// replaces a good adapter.
fn extract_adapter(archive: &[u8], target: &Path) -> anyhow::Result<()> {
    let parent = target.parent().unwrap_or(Path::new("."));
    let staging = tempfile::tempdir_in(parent)
        .with_context(|| format!("failed to create a temporary folder in {}", parent.display()))?;
    tar::Archive::new(Cursor::new(archive))
        .unpack(staging.path())
        .context("the downloaded adapter is not a valid tar archive")?;

    for required in ["adapter_config.json", "adapter_model.safetensors"] {
        if !staging.path().join(required).is_file() {
            bail!("the downloaded adapter archive has no {required} at its root");
        }
    }

    if target.exists() {
        std::fs::remove_dir_all(target)
            .with_context(|| format!("failed to remove the previous adapter at {}", target.display()))?;
    }
    let staged: PathBuf = staging.keep();
    std::fs::rename(&staged, target)
        .with_context(|| format!("failed to move the adapter into {}", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, contents) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(contents.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *contents).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn extract_adapter_replaces_previous_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(ADAPTER_FOLDER);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("stale.txt"), "old").unwrap();
        let archive = tar_with(&[
            ("adapter_config.json", b"{}"),
            ("adapter_model.safetensors", b"weights"),
        ]);

        extract_adapter(&archive, &target).unwrap();

        assert_eq!(std::fs::read(target.join("adapter_model.safetensors")).unwrap(), b"weights");
        assert!(!target.join("stale.txt").exists());
    }

    #[test]
    fn extract_adapter_rejects_incomplete_archive() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join(ADAPTER_FOLDER);
        let archive = tar_with(&[("adapter_config.json", b"{}")]);

        let error = extract_adapter(&archive, &target).unwrap_err();

        assert!(error.to_string().contains("adapter_model.safetensors"), "{error:#}");
        assert!(!target.exists());
    }

    #[test]
    fn example_dataset_has_forty_conversations() {
        let conversations: Vec<studio_core::dataset::Conversation> = EXAMPLE_DATASET
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();

        assert_eq!(conversations.len(), 40);
        assert!(conversations.iter().all(|c| c.messages.len() >= 2));
    }

    #[test]
    fn estimated_steps_counts_partial_batches() {
        let args = DemoArgs {
            n_epochs: 3,
            batch_size: 16,
            learning_rate: 1e-3,
            max_seq_len: 256,
            r: 8,
            alpha: 16.0,
        };

        assert_eq!(estimated_steps(&args), 9);
    }
}
