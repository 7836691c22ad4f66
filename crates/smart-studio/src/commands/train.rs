//! `smart-studio train`: one local fine-tuning run, no server and no database.
//!
//! The run is described by the same JSON body as `POST /v1/fine_tuning/jobs` (from `--config`),
//! with flags overriding its fields, so a local run and a job train identically.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use studio_core::dataset::{parse_dataset, Conversation};
use studio_core::JobSpec;
use studio_store::ModelCatalog;
use studio_train::{
    run_sft, CheckpointInfo, EventLevel, RunOutcome, SftJob, StepMetrics, StopRequest, TrainObserver,
};
use studio_worker::plan;

use crate::cli::TrainArgs;
use crate::config::Config;

pub async fn run(config: &Config, args: &TrainArgs) -> anyhow::Result<()> {
    let models_dir = config.models_dir.clone();
    let args = args.clone();
    tokio::task::spawn_blocking(move || train(&models_dir, &args))
        .await
        .context("the training task panicked")?
}

fn train(models_dir: &Path, args: &TrainArgs) -> anyhow::Result<()> {
    let body = job_body(args)?;
    let spec = JobSpec::parse(&body, args.seed.unwrap_or(42))
        .map_err(|err| anyhow::anyhow!("{}: {err}", err.param.as_deref().unwrap_or("config")))?;
    let model_path = resolve_model(models_dir, &spec.model)?;
    let examples = read_dataset(&args.training_file)?;
    let validation = args.validation_file.as_deref().map(read_dataset).transpose()?;

    let output = &args.output_dir;
    let checkpoints = output.join("checkpoints");
    let job = SftJob {
        model_path: &model_path,
        base_model_name: &spec.model,
        examples: &examples,
        validation: validation.as_deref(),
        approach: plan::approach(&spec),
        settings: plan::train_settings(&spec),
        output_dir: output,
        checkpoint_dir: Some(&checkpoints),
        resume_from: args.resume_from.as_deref(),
        export_merged: args.merged,
    };
    println!("Training {} on {} examples from {}", spec.model, examples.len(), args.training_file.display());
    println!("Settings: {}", serde_json::to_string(&body)?);

    let mut observer = ProgressObserver::new(output)?;
    let outcome = run_sft(&job, &mut observer)?;
    observer.bar.finish_and_clear();
    match outcome {
        RunOutcome::Succeeded(summary) => {
            println!(
                "Done: {} steps, {} tokens, {} skipped steps; metrics in {}",
                summary.steps,
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

/// Builds the job body from the `--config` file, or an empty one, with flags written over it.
fn job_body(args: &TrainArgs) -> anyhow::Result<Value> {
    let mut body = match &args.config {
        Some(path) => {
            let text = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not a JSON object", path.display()))?
        }
        None => json!({}),
    };
    let Some(object) = body.as_object_mut() else {
        bail!("the config file must hold a JSON object shaped like a job create request");
    };
    if let Some(model) = &args.model {
        object.insert("model".into(), json!(model));
    }
    if !object.contains_key("model") {
        bail!("no model given; pass --model NAME or PATH, or set \"model\" in the config file");
    }
    // The spec requires a file id; a local run reads --training-file instead.
    object.insert("training_file".into(), json!("file-local"));
    object.remove("validation_file");
    if let Some(seed) = args.seed {
        object.insert("seed".into(), json!(seed));
    }

    let hyperparameters = [
        ("n_epochs", args.n_epochs.map(|v| json!(v))),
        ("batch_size", args.batch_size.map(|v| json!(v))),
        ("gradient_accumulation_steps", args.gradient_accumulation_steps.map(|v| json!(v))),
        ("learning_rate", args.learning_rate.map(|v| json!(v))),
        ("max_seq_len", args.max_seq_len.map(|v| json!(v))),
        ("lr_scheduler", args.lr_scheduler.clone().map(|v| json!(v))),
        ("warmup_ratio", args.warmup_ratio.map(|v| json!(v))),
        ("checkpoint_interval", args.checkpoint_interval.map(|v| json!(v))),
        ("eval_interval", args.eval_interval.map(|v| json!(v))),
    ];
    for (key, value) in hyperparameters {
        if let Some(value) = value {
            section(object, &["method", "supervised", "hyperparameters"]).insert(key.into(), value);
        }
    }
    if object.contains_key("method") {
        object.entry("method").or_insert(json!({}))["type"] = json!("supervised");
    }

    if let Some(approach) = &args.approach {
        section(object, &["training_type"]).insert("type".into(), json!(approach));
    }
    let lora = [
        ("r", args.r.map(|v| json!(v))),
        ("alpha", args.alpha.map(|v| json!(v))),
        ("target_modules", args.target_modules.as_ref().map(|v| json!(v.split(',').collect::<Vec<_>>()))),
    ];
    for (key, value) in lora {
        if let Some(value) = value {
            section(object, &["training_type"]).insert(key.into(), value);
        }
    }
    Ok(body)
}

/// Returns the object at `path` inside `object`, created when missing.
fn section<'a>(object: &'a mut Map<String, Value>, path: &[&str]) -> &'a mut Map<String, Value> {
    let mut current = object;
    for key in path {
        let entry = current.entry(key.to_string()).or_insert_with(|| json!({}));
        if !entry.is_object() {
            *entry = json!({});
        }
        current = entry.as_object_mut().expect("replaced by an object above");
    }
    current
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

pub fn read_dataset(path: &Path) -> anyhow::Result<Vec<Conversation>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (conversations, _) = parse_dataset(&bytes).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
    Ok(conversations)
}

/// A progress bar with step, loss, tokens/s and time left, and every step in `metrics.csv`.
struct ProgressObserver {
    bar: ProgressBar,
    csv: fs::File,
}

impl ProgressObserver {
    fn new(output: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(output).with_context(|| format!("cannot create {}", output.display()))?;
        let mut csv = fs::File::create(output.join("metrics.csv"))?;
        writeln!(csv, "step,epoch,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy,learning_rate,grad_norm,tokens_per_second")?;
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  elapsed {elapsed}  left {eta}")
                .expect("valid progress template"),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        Ok(Self { bar, csv })
    }
}

impl ProgressObserver {
    /// Prints above the bar, or plainly when the bar is hidden because output is not a terminal.
    fn print(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl TrainObserver for ProgressObserver {
    fn on_step(&mut self, m: &StepMetrics) {
        self.bar.set_length(m.total_steps);
        self.bar.set_position(m.step);
        let valid = m.valid_loss.map(|v| format!("  valid {v:.4}")).unwrap_or_default();
        let message = format!("loss {:.4}{valid}  {:.0} tokens/s", m.train_loss, m.tokens_per_second);
        if self.bar.is_hidden() {
            // Not a terminal (a log file or CI): one line per step instead of a bar.
            println!("step {}/{}  {message}", m.step, m.total_steps);
        }
        self.bar.set_message(message);
        let optional = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        let _ = writeln!(
            self.csv,
            "{},{},{},{},{},{},{},{},{}",
            m.step,
            m.epoch,
            m.train_loss,
            m.train_mean_token_accuracy,
            optional(m.valid_loss),
            optional(m.valid_mean_token_accuracy),
            m.learning_rate,
            m.grad_norm,
            m.tokens_per_second
        );
    }

    fn on_event(&mut self, level: EventLevel, message: &str) {
        let prefix = match level {
            EventLevel::Info => "",
            EventLevel::Warn => "warning: ",
            EventLevel::Error => "error: ",
        };
        self.print(format!("{prefix}{message}"));
    }

    fn stop_request(&mut self) -> Option<StopRequest> {
        None
    }

    fn on_checkpoint(&mut self, checkpoint: &CheckpointInfo) {
        self.print(format!("checkpoint at step {}: {}", checkpoint.step, checkpoint.dir.display()));
    }
}
