//! `smart-studio train`: one local fine-tuning run, no server and no database.
//!
//! The run is described by the same JSON body as `POST /v1/fine_tuning/jobs` (from `--config`),
//! with flags overriding its fields, so a local run and a job train identically: supervised
//! fine-tuning, DPO or distillation, as `method.type` or `--method` selects.

mod body;
mod data;
mod methods;
mod progress;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use studio_core::dataset::{parse_dataset, Conversation};
use studio_core::spec::Method;
use studio_core::JobSpec;
use studio_store::ModelCatalog;
use studio_train::RunOutcome;

use crate::cli::TrainArgs;
use crate::config::Config;

pub async fn run(config: &Config, args: &TrainArgs) -> anyhow::Result<()> {
    let models_dir = config.models_dir.clone();
    let args = args.clone();
    tokio::task::spawn_blocking(move || train(&models_dir, &args))
        .await
        .context("the training task panicked")?
}

/// The inputs of every method of a local run: the flags, the parsed spec and the models.
struct LocalRun<'a> {
    args: &'a TrainArgs,
    spec: &'a JobSpec,
    model_path: &'a Path,
    models_dir: &'a Path,
    checkpoint_dir: PathBuf,
}

fn train(models_dir: &Path, args: &TrainArgs) -> anyhow::Result<()> {
    let body = body::job_body(args)?;
    let spec = JobSpec::parse(&body, args.seed.unwrap_or(42))
        .map_err(|err| anyhow::anyhow!("{}: {err}", err.param.as_deref().unwrap_or("config")))?;
    let model_path = resolve_model(models_dir, &spec.model)?;
    let output = &args.output_dir;
    fs::create_dir_all(output).with_context(|| format!("cannot create {}", output.display()))?;
    println!("Settings: {}", serde_json::to_string(&body)?);

    let run = LocalRun {
        args,
        spec: &spec,
        model_path: &model_path,
        models_dir,
        checkpoint_dir: output.join("checkpoints"),
    };
    let outcome = match &spec.method {
        Method::Supervised { .. } => methods::supervised(&run)?,
        Method::Dpo { .. } => methods::dpo(&run)?,
        Method::Distillation { .. } => methods::distillation(&run)?,
    };
    match outcome {
        RunOutcome::Succeeded(summary) => {
            println!(
                "Done: {} {}, {} tokens, {} skipped; metrics in {}",
                summary.steps,
                if summary.steps == 1 { "step" } else { "steps" },
                summary.trained_tokens,
                summary.skipped_steps,
                output.join("metrics.csv").display()
            );
            for (kind, dir) in summary.artifacts {
                println!("{}: {}", kind.as_str(), dir.display());
            }
            Ok(())
        }
        RunOutcome::Stopped { steps, .. } => bail!("the run stopped after {steps} steps"),
    }
}

/// Resolves a model given as a path to a GGUF file or Hugging Face folder, or as a name in the
/// models folder.
pub fn resolve_model(models_dir: &Path, model: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    Ok(ModelCatalog::new(models_dir).resolve(model)?.path)
}

/// Reads a dataset file of any supervised format, prompts alone included.
pub fn read_dataset(path: &Path) -> anyhow::Result<Vec<Conversation>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (conversations, _) = parse_dataset(&bytes).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
    Ok(conversations)
}
