use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use studio_core::dataset::Conversation;

use crate::batch::{batch_loss, Batch};
use crate::chat::{ChatEncoder, ChatTemplate, EncodedExample};
use crate::loader::{load_model, LoadedModel};
use crate::lora;
use crate::model::{ForwardContext, Llama};
use crate::optim::{global_grad_norm, AdamW, AdamWConfig};
use crate::rng::Rng;
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

/// Trains a LoRA adapter on `job.examples` and writes it to `job.output_dir`.
///
/// Runs on the calling thread until done; call it from a blocking thread in async code.
pub fn run_lora_sft(job: &SftJob<'_>, observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
    lora::validate(&job.lora)?;
    validate_settings(&job.settings)?;
    let device = Device::Cpu;

    let loaded = load_model(job.model_path, &device)?;
    observer.on_event(EventLevel::Info, &format!("Loaded base model {}", job.base_model_name));
    let examples = encode_examples(&loaded, job.examples, job.settings.max_seq_len, observer)?;

    let mut rng = Rng::new(job.settings.seed);
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &device)?;
    drop(loaded.weights);
    lora::attach(&mut model, &job.lora, &mut rng)?;
    let optimizer_config = AdamWConfig {
        weight_decay: job.settings.weight_decay,
        ..AdamWConfig::default()
    };
    let mut optimizer = AdamW::new(model.lora_vars(), optimizer_config)?;

    let settings = &job.settings;
    let steps_per_epoch = examples.len().div_ceil(settings.batch_size);
    let total_steps = (steps_per_epoch * settings.n_epochs) as u64;
    observer.on_event(
        EventLevel::Info,
        &format!(
            "Training {} examples for {} epochs: {total_steps} steps, {} trainable parameters",
            examples.len(),
            settings.n_epochs,
            lora::trainable_parameters(&model.config, &job.lora),
        ),
    );

    let mut step = 0u64;
    let mut trained_tokens = 0u64;
    for epoch in 0..settings.n_epochs {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        rng.shuffle(&mut order);
        for (index_in_epoch, chunk) in order.chunks(settings.batch_size).enumerate() {
            if observer.should_cancel() {
                observer.on_event(EventLevel::Info, &format!("Cancelled before step {}", step + 1));
                return Ok(RunOutcome::Cancelled { steps: step });
            }
            let started = Instant::now();
            let rows: Vec<&EncodedExample> = chunk.iter().map(|&i| &examples[i]).collect();
            let batch = Batch::new(&rows, loaded.special.pad, &device)?;

            let mut ctx = ForwardContext {
                rng: Some(&mut rng),
                adapters_enabled: true,
            };
            let loss = batch_loss(&model, &batch, &mut ctx)?;
            let mean_loss = (loss.sum_nll / batch.n_targets as f64)?;
            let train_loss = f64::from(mean_loss.to_scalar::<f32>()?);
            let grads = mean_loss.backward()?;
            let grad_norm = global_grad_norm(optimizer.params(), &grads)?;
            if !train_loss.is_finite() || !grad_norm.is_finite() {
                // NOTE: the run stops at the first non-finite value; skipping such steps and
                // failing only when they repeat is not implemented yet.
                return Err(TrainError::NonFinite(format!(
                    "step {} produced loss {train_loss} and gradient norm {grad_norm}; lower the learning rate",
                    step + 1
                )));
            }
            optimizer.step(&grads, settings.learning_rate)?;

            step += 1;
            trained_tokens += batch.n_tokens as u64;
            let seconds = started.elapsed().as_secs_f64();
            let metrics = StepMetrics {
                step,
                total_steps,
                epoch: epoch as f64 + (index_in_epoch + 1) as f64 / steps_per_epoch as f64,
                train_loss,
                learning_rate: settings.learning_rate,
                grad_norm,
                tokens_per_second: batch.n_tokens as f64 / seconds.max(1e-9),
                trained_tokens,
            };
            tracing::debug!(step, train_loss, grad_norm, seconds, "optimizer step");
            observer.on_step(&metrics);
        }
    }

    lora::save_adapter(&model, &job.lora, job.base_model_name, job.output_dir)?;
    observer.on_event(EventLevel::Info, &format!("Saved the adapter after {step} steps"));
    Ok(RunOutcome::Succeeded { trained_tokens, steps: step })
}

fn validate_settings(settings: &TrainSettings) -> Result<(), TrainError> {
    let invalid = |message: String, param: &str| {
        Err(TrainError::InvalidData {
            message,
            param: Some(format!("method.supervised.hyperparameters.{param}")),
        })
    };
    if settings.n_epochs == 0 {
        return invalid("n_epochs must be at least 1".into(), "n_epochs");
    }
    if settings.batch_size == 0 {
        return invalid("batch_size must be at least 1".into(), "batch_size");
    }
    if settings.max_seq_len < 2 {
        return invalid(format!("max_seq_len {} is too short; use at least 2", settings.max_seq_len), "max_seq_len");
    }
    if !(settings.learning_rate.is_finite() && settings.learning_rate > 0.0) {
        return invalid(format!("learning_rate {} must be a positive number", settings.learning_rate), "learning_rate");
    }
    Ok(())
}

/// Renders and tokenizes every conversation, truncates it to `max_seq_len`, and drops (with a
/// warning event) those left without a target token.
pub fn encode_examples(
    loaded: &LoadedModel,
    conversations: &[Conversation],
    max_seq_len: usize,
    observer: &mut dyn TrainObserver,
) -> Result<Vec<EncodedExample>, TrainError> {
    let source = loaded.chat_template.as_deref().ok_or_else(|| TrainError::InvalidData {
        message: "the base model has no chat template, so conversations cannot be rendered".into(),
        param: Some("model".into()),
    })?;
    let template = ChatTemplate::new(source)?;
    let end_of_turn = loaded
        .tokenizer
        .id_to_token(loaded.special.eos)
        .unwrap_or_default();
    let encoder = ChatEncoder {
        template: &template,
        tokenizer: &loaded.tokenizer,
        end_of_turn: &end_of_turn,
    };

    let mut examples = Vec::with_capacity(conversations.len());
    let mut dropped = Vec::new();
    for (index, conversation) in conversations.iter().enumerate() {
        let mut example = encoder.encode(conversation)?;
        example.truncate(max_seq_len);
        if example.n_targets() == 0 {
            dropped.push(index + 1);
        } else {
            examples.push(example);
        }
    }
    if !dropped.is_empty() {
        observer.on_event(
            EventLevel::Warn,
            &format!(
                "Dropped {} examples with no assistant token within max_seq_len {max_seq_len} (lines {})",
                dropped.len(),
                summarize_lines(&dropped)
            ),
        );
    }
    if examples.is_empty() {
        return Err(TrainError::InvalidData {
            message: format!(
                "no example has an assistant token within max_seq_len {max_seq_len}; raise max_seq_len or shorten the prompts"
            ),
            param: Some("method.supervised.hyperparameters.max_seq_len".into()),
        });
    }
    Ok(examples)
}

fn summarize_lines(lines: &[usize]) -> String {
    let shown: Vec<String> = lines.iter().take(10).map(usize::to_string).collect();
    let more = lines.len().saturating_sub(10);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}
