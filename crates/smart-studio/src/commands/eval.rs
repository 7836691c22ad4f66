//! `smart-studio eval`: mean loss and token accuracy of a model, with an optional adapter, on a
//! dataset file, to compare a model before and after fine-tuning.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use studio_train::data::encode_examples;
use studio_train::loader::load_model;
use studio_train::model::Llama;
use studio_train::{evaluate, lora, EventLevel, StepMetrics, StopRequest, TrainObserver};

use crate::cli::EvalArgs;
use crate::commands::train::{read_dataset, resolve_model};
use crate::config::Config;

pub async fn run(config: &Config, args: &EvalArgs) -> anyhow::Result<()> {
    let models_dir = config.models_dir.clone();
    let args = args.clone();
    tokio::task::spawn_blocking(move || eval(models_dir, &args))
        .await
        .context("the evaluation task panicked")?
}

fn eval(models_dir: PathBuf, args: &EvalArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let model_path = resolve_model(&models_dir, &args.model)?;
    let loaded = load_model(&model_path, &device)?;
    let conversations = read_dataset(&args.data)?;
    let examples = encode_examples(&loaded, &conversations, args.max_seq_len, "--max-seq-len", "dataset", &mut PrintEvents)?;

    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &device)?;
    if let Some(adapter) = &args.adapter {
        lora::apply_adapter(&mut model, adapter)?;
    }
    let (loss, accuracy) = evaluate(&model, &examples, args.batch_size, loaded.special.pad, &device)?;
    let targets: usize = examples.iter().map(|e| e.n_targets()).sum();
    let with = args.adapter.as_ref().map(|a| format!(" with adapter {}", a.display())).unwrap_or_default();
    println!("model {}{with}", args.model);
    println!("examples {} (target tokens {targets})", examples.len());
    println!("mean_loss {loss:.6}");
    println!("mean_token_accuracy {accuracy:.6}");
    Ok(())
}

struct PrintEvents;

impl TrainObserver for PrintEvents {
    fn on_step(&mut self, _metrics: &StepMetrics) {}

    fn on_event(&mut self, _level: EventLevel, message: &str) {
        eprintln!("{message}");
    }

    fn stop_request(&mut self) -> Option<StopRequest> {
        None
    }
}
