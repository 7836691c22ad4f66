use std::path::Path;

use studio_core::dataset::Conversation;

use crate::TrainError;

/// LoRA hyperparameters, with PEFT's meaning.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
        }
    }
}

/// Optimisation settings of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    pub n_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Longer examples are truncated to this many tokens.
    pub max_seq_len: usize,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            n_epochs: 3,
            batch_size: 16,
            learning_rate: 1e-4,
            max_seq_len: 1024,
            weight_decay: 0.0,
            seed: 42,
        }
    }
}

/// One supervised LoRA run: the adapter is written to `output_dir` as
/// `adapter_config.json` and `adapter_model.safetensors`.
pub struct SftJob<'a> {
    /// A GGUF file.
    pub model_path: &'a Path,
    /// Written to `base_model_name_or_path` in the adapter config.
    pub base_model_name: &'a str,
    pub examples: &'a [Conversation],
    pub lora: LoraSettings,
    pub settings: TrainSettings,
    pub output_dir: &'a Path,
}

/// Figures of one optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMetrics {
    /// 1-based.
    pub step: u64,
    pub total_steps: u64,
    /// Fractional epoch reached at the end of this step.
    pub epoch: f64,
    pub train_loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    /// Tokens processed so far, padding excluded.
    pub trained_tokens: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventLevel {
    Info,
    Warn,
    Error,
}

/// Receives progress from a run. Called on the training thread, so keep each call cheap.
pub trait TrainObserver {
    fn on_step(&mut self, metrics: &StepMetrics);
    fn on_event(&mut self, level: EventLevel, message: &str);
    /// Checked between steps; `true` stops the run without writing an adapter.
    fn should_cancel(&mut self) -> bool;
}

#[derive(Clone, Debug, PartialEq)]
pub enum RunOutcome {
    Succeeded { trained_tokens: u64, steps: u64 },
    Cancelled { steps: u64 },
}

/// Train a LoRA adapter on `job.examples` and write it to `job.output_dir`.
pub fn run_lora_sft(
    job: &SftJob<'_>,
    observer: &mut dyn TrainObserver,
) -> Result<RunOutcome, TrainError> {
    let _ = (job, observer);
    todo!("the training loop")
}
