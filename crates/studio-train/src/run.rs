//! The supervised fine-tuning loop, for LoRA and full-parameter training.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use studio_core::dataset::Conversation;

use crate::batch::{batch_loss, Batch};
use crate::chat::EncodedExample;
use crate::checkpoint::{self, TrainerState};
use crate::data::{encode_examples, hold_out};
use crate::export::{save_model_folder, FolderMetadata, DEFAULT_MAX_SHARD_BYTES};
use crate::loader::load_model;
use crate::lora;
use crate::model::{ForwardContext, Llama};
use crate::optim::AdamW;
use crate::rng::Rng;
use crate::schedule::DecayKind;
use crate::steps::{LoopEnd, StepGradients, StepLoop, StepMethod};
use crate::TrainError;

/// LoRA hyperparameters, with PEFT's meaning.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names such as `q_proj`, or `all-linear` for every attention and MLP projection.
    pub target_modules: Vec<String>,
    /// Scale by `alpha / √r` (rsLoRA) instead of `alpha / r`.
    pub use_rslora: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).to_vec(),
            use_rslora: false,
        }
    }
}

/// The parameters a run trains.
#[derive(Clone, Debug, PartialEq)]
pub enum Approach {
    /// A frozen base with trained adapter matrices.
    Lora(LoraSettings),
    /// Every weight.
    Full,
}

/// Full fine-tuning learning rates outside this range get a warning event: below it training
/// barely moves, and above it a small model quickly loses what it knew.
pub const FULL_LEARNING_RATE_RANGE: (f64, f64) = (1e-5, 5e-5);

/// Optimisation settings of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSettings {
    pub n_epochs: usize,
    /// Examples per micro-batch; each micro-batch is padded to its own longest row.
    pub batch_size: usize,
    /// Micro-batches per optimizer step, so a step uses `batch_size × gradient_accumulation_steps`
    /// examples. The loss is normalised by the target tokens of the whole step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    pub lr_scheduler: DecayKind,
    /// Fraction of the steps spent warming up linearly from zero.
    pub warmup_ratio: f64,
    /// Decoupled (AdamW) weight decay.
    pub weight_decay: f64,
    /// Clips the global gradient norm to this value; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Longer examples are truncated to this many tokens.
    pub max_seq_len: usize,
    pub seed: u64,
    /// Evaluates the validation set every this many steps; 0 evaluates at epoch ends only.
    pub eval_interval: u64,
    /// Writes a checkpoint every this many steps; 0 writes none on an interval.
    pub checkpoint_interval: u64,
    /// Writes this many checkpoints spread evenly over the run, the last at the final step.
    pub n_checkpoints: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            n_epochs: 3,
            batch_size: 16,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            lr_scheduler: DecayKind::Linear,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            max_seq_len: 1024,
            seed: 42,
            eval_interval: 0,
            checkpoint_interval: 0,
            n_checkpoints: 0,
        }
    }
}

/// One supervised run.
pub struct SftJob<'a> {
    /// A GGUF file or a Hugging Face model folder.
    pub model_path: &'a Path,
    /// Written to `base_model_name_or_path` in the adapter config.
    pub base_model_name: &'a str,
    pub examples: &'a [Conversation],
    /// Without it, a tenth of a large enough training set is held out.
    pub validation: Option<&'a [Conversation]>,
    pub approach: Approach,
    pub settings: TrainSettings,
    /// Receives `adapter/`, `merged/` or `model/` (see [`ArtifactKind`]).
    pub output_dir: &'a Path,
    /// Receives `step-{n}/` checkpoint folders; `None` writes no checkpoints.
    pub checkpoint_dir: Option<&'a Path>,
    /// A checkpoint folder of an earlier run of the same job to continue from.
    pub resume_from: Option<&'a Path>,
    /// For LoRA, also writes the base model with the adapter merged in.
    pub export_merged: bool,
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
    /// Share of target tokens the model predicted by argmax before the update.
    pub train_mean_token_accuracy: f64,
    pub valid_loss: Option<f64>,
    pub valid_mean_token_accuracy: Option<f64>,
    pub learning_rate: f64,
    /// Before clipping.
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

/// A checkpoint folder written during the run.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    pub step: u64,
    pub dir: PathBuf,
    pub metrics: StepMetrics,
}

/// A request from the observer to stop a run between steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// Stop at once and write nothing more: the run is abandoned, as on a cancel.
    Abandon,
    /// Write a checkpoint of the steps done so far unless one exists, then stop, so that a
    /// later run resumes there, as on a pause or a worker shutdown.
    Suspend,
}

/// Receives progress from a run. Called on the training thread, so keep each call cheap.
pub trait TrainObserver {
    fn on_step(&mut self, metrics: &StepMetrics);
    /// Receives a DPO step with its rewards; observers that record only the common figures
    /// need not override it.
    fn on_preference_step(&mut self, metrics: &StepMetrics, _preference: &crate::dpo::PreferenceMetrics) {
        self.on_step(metrics);
    }
    fn on_event(&mut self, level: EventLevel, message: &str);
    /// Checked before the first step and after each step; a request stops the run without
    /// writing its artifacts.
    fn stop_request(&mut self) -> Option<StopRequest>;
    /// Called after a checkpoint folder is complete.
    fn on_checkpoint(&mut self, _checkpoint: &CheckpointInfo) {}
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArtifactKind {
    /// A PEFT adapter folder.
    Adapter,
    /// The base model with the adapter merged in, as a Hugging Face folder.
    Merged,
    /// A fully fine-tuned model, as a Hugging Face folder.
    Model,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Adapter => "adapter",
            ArtifactKind::Merged => "merged",
            ArtifactKind::Model => "model",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainSummary {
    pub trained_tokens: u64,
    pub steps: u64,
    /// Steps whose loss or gradient was not finite and so applied no update.
    pub skipped_steps: u64,
    pub artifacts: Vec<(ArtifactKind, PathBuf)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RunOutcome {
    Succeeded(TrainSummary),
    /// Stopped early on the observer's request after `steps` steps. A `Suspend` wrote a
    /// checkpoint of the last step (unless there was no step or the job has no checkpoint
    /// folder) and handed it to [`TrainObserver::on_checkpoint`].
    Stopped { steps: u64, request: StopRequest },
}

/// Runs supervised fine-tuning and writes the artifacts under `job.output_dir`.
///
/// Runs on the calling thread until done; call it from a blocking thread in async code.
pub fn run_sft(job: &SftJob<'_>, observer: &mut dyn TrainObserver) -> Result<RunOutcome, TrainError> {
    validate_settings(&job.settings, SUPERVISED_HYPERPARAMETERS)?;
    if let Approach::Lora(settings) = &job.approach {
        lora::validate(settings)?;
    }
    let device = Device::Cpu;
    let settings = &job.settings;

    let mut loaded = load_model(job.model_path, &device)?;
    observer.on_event(EventLevel::Info, &format!("Loaded base model {}", job.base_model_name));
    let max_seq_len_param = format!("{SUPERVISED_HYPERPARAMETERS}.max_seq_len");
    let examples = encode_examples(&loaded, job.examples, settings.max_seq_len, &max_seq_len_param, "training file", observer)?;
    if examples.is_empty() {
        return Err(invalid("the training file has no examples", "training_file"));
    }
    let (train, valid) = match job.validation {
        Some(conversations) => {
            let valid = encode_examples(&loaded, conversations, settings.max_seq_len, &max_seq_len_param, "validation file", observer)?;
            (examples, valid)
        }
        None => {
            let (train, valid) = hold_out(examples, settings.seed);
            if !valid.is_empty() {
                observer.on_event(
                    EventLevel::Info,
                    &format!("Held out {} of the training examples for validation", valid.len()),
                );
            }
            (train, valid)
        }
    };

    let mut rng = Rng::new(settings.seed);
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, &device)?;
    loaded.weights.clear();
    let vars = trainable_vars(&mut model, &job.approach, &mut rng, observer, settings.learning_rate)?;

    let method = SupervisedSteps {
        model: &model,
        vars: &vars,
        train: &train,
        valid: &valid,
        batch_size: settings.batch_size,
        pad: loaded.special.pad,
    };
    let describe = |total_steps: u64, trainable: usize| {
        format!(
            "Training {} for {}: {}, {trainable} trainable parameters",
            plural(train.len() as u64, "example"),
            plural(settings.n_epochs as u64, "epoch"),
            plural(total_steps, "step"),
        )
    };
    let steps = StepLoop {
        job,
        model: &model,
        vars: &vars,
        n_items: train.len(),
        rng,
    };
    let progress = match steps.run(&method, observer, &describe)? {
        LoopEnd::Finished(progress) => progress,
        LoopEnd::Stopped(outcome) => return Ok(outcome),
    };

    let metadata = FolderMetadata {
        tokenizer: &loaded.tokenizer,
        chat_template: loaded.chat_template.as_deref(),
        special: loaded.special,
    };
    let artifacts = write_artifacts(job, &model, &metadata)?;
    observer.on_event(EventLevel::Info, &format!("Saved the result after {}", plural(progress.step, "step")));
    Ok(RunOutcome::Succeeded(TrainSummary {
        trained_tokens: progress.trained_tokens,
        steps: progress.step,
        skipped_steps: progress.skipped_steps,
        artifacts,
    }))
}

/// `1 step`, `2 steps`.
pub(crate) fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

pub(crate) fn invalid(message: &str, param: &str) -> TrainError {
    TrainError::InvalidData {
        message: message.to_string(),
        param: Some(param.to_string()),
    }
}

/// The request path of a supervised job's hyperparameters, which errors name as the field to fix.
pub(crate) const SUPERVISED_HYPERPARAMETERS: &str = "method.supervised.hyperparameters";

/// Checks the ranges of `settings`. Errors name the field under `hyperparameters_at`, the request
/// path of the method's hyperparameters.
pub(crate) fn validate_settings(settings: &TrainSettings, hyperparameters_at: &str) -> Result<(), TrainError> {
    let param = |name: &str| format!("{hyperparameters_at}.{name}");
    let check = |ok: bool, message: String, name: &str| if ok { Ok(()) } else { Err(invalid(&message, &param(name))) };
    check(settings.n_epochs >= 1, "n_epochs must be at least 1".into(), "n_epochs")?;
    check(settings.batch_size >= 1, "batch_size must be at least 1".into(), "batch_size")?;
    check(settings.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1".into(), "gradient_accumulation_steps")?;
    check(settings.max_seq_len >= 2, format!("max_seq_len {} is too short; use at least 2", settings.max_seq_len), "max_seq_len")?;
    check(
        settings.learning_rate.is_finite() && settings.learning_rate > 0.0,
        format!("learning_rate {} must be a positive number", settings.learning_rate),
        "learning_rate",
    )?;
    check((0.0..1.0).contains(&settings.warmup_ratio), format!("warmup_ratio {} is outside [0, 1)", settings.warmup_ratio), "warmup_ratio")?;
    check(settings.weight_decay >= 0.0, format!("weight_decay {} must not be negative", settings.weight_decay), "weight_decay")?;
    check(settings.max_grad_norm >= 0.0, format!("max_grad_norm {} must not be negative", settings.max_grad_norm), "max_grad_norm")
}

/// Attaches adapters or unfreezes every weight, and returns the trained variables by name.
pub(crate) fn trainable_vars(model: &mut Llama, approach: &Approach, rng: &mut Rng, observer: &mut dyn TrainObserver, learning_rate: f64) -> Result<Vec<(String, Var)>, TrainError> {
    match approach {
        Approach::Lora(settings) => {
            lora::attach(model, settings, rng)?;
            Ok(lora::adapter_vars(model))
        }
        Approach::Full => {
            let (low, high) = FULL_LEARNING_RATE_RANGE;
            if !(low..=high).contains(&learning_rate) {
                observer.on_event(
                    EventLevel::Warn,
                    &format!("learning_rate {learning_rate:e} is outside {low:e}..{high:e}, the usual range for full fine-tuning"),
                );
            }
            Ok(model.make_all_trainable()?)
        }
    }
}

/// The supervised step: cross-entropy on the assistant tokens.
struct SupervisedSteps<'a> {
    model: &'a Llama,
    vars: &'a [(String, Var)],
    train: &'a [EncodedExample],
    valid: &'a [EncodedExample],
    batch_size: usize,
    pad: u32,
}

impl StepMethod for SupervisedSteps<'_> {
    fn gradients(&self, indices: &[usize], rng: &mut Rng) -> Result<StepGradients, TrainError> {
        let rows: Vec<&EncodedExample> = indices.iter().map(|&i| &self.train[i]).collect();
        let totals = accumulate_gradients(self.model, self.vars, &rows, self.batch_size, rng, self.pad, self.model.device())?;
        Ok(StepGradients {
            loss: totals.loss,
            token_accuracy: totals.n_correct as f64 / totals.n_targets.max(1) as f64,
            n_tokens: totals.n_tokens,
            grads: totals.grads,
            preference: None,
        })
    }

    fn evaluate(&self) -> Result<Option<(f64, f64)>, TrainError> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        evaluate(self.model, self.valid, self.batch_size, self.pad, self.model.device()).map(Some)
    }
}

struct StepTotals {
    /// Mean loss over the step's target tokens.
    loss: f64,
    n_correct: usize,
    n_targets: usize,
    n_tokens: usize,
    /// One per trained variable, for the whole step.
    grads: Vec<Tensor>,
}

/// Runs the step's micro-batches and sums their gradients. Each micro-batch's summed loss is
/// divided by the target tokens of the whole step, so splitting a step into more micro-batches
/// leaves its gradient unchanged.
fn accumulate_gradients(
    model: &Llama,
    vars: &[(String, Var)],
    rows: &[&EncodedExample],
    batch_size: usize,
    rng: &mut Rng,
    pad: u32,
    device: &Device,
) -> Result<StepTotals, TrainError> {
    let batches = rows
        .chunks(batch_size)
        .map(|chunk| Batch::new(chunk, pad, device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let n_targets: usize = batches.iter().map(|b| b.n_targets).sum();
    let mut totals = StepTotals {
        loss: 0.0,
        n_correct: 0,
        n_targets,
        n_tokens: batches.iter().map(|b| b.n_tokens).sum(),
        grads: Vec::new(),
    };
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    for batch in &batches {
        let mut ctx = ForwardContext {
            rng: Some(&mut *rng),
            adapters_enabled: true,
        };
        let loss = batch_loss(model, batch, &mut ctx)?;
        let scaled = (loss.sum_nll / n_targets as f64)?;
        totals.loss += scaled.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        totals.n_correct += loss.n_correct;
        let store = scaled.backward()?;
        for (slot, (_, var)) in grads.iter_mut().zip(vars) {
            if let Some(grad) = store.get(var) {
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + grad)?,
                    None => grad.clone(),
                });
            }
        }
    }
    totals.grads = grads
        .into_iter()
        .zip(vars)
        .map(|(grad, (name, _))| {
            grad.ok_or_else(|| TrainError::Candle(candle_core::Error::Msg(format!("{name} received no gradient"))))
        })
        .collect::<Result<_, _>>()?;
    Ok(totals)
}

/// Mean loss and token accuracy over every target token of `examples`, without dropout.
pub fn evaluate(model: &Llama, examples: &[EncodedExample], batch_size: usize, pad: u32, device: &Device) -> Result<(f64, f64), TrainError> {
    let (mut sum_nll, mut n_correct, mut n_targets) = (0f64, 0usize, 0usize);
    let rows: Vec<&EncodedExample> = examples.iter().collect();
    for chunk in rows.chunks(batch_size.max(1)) {
        let batch = Batch::new(chunk, pad, device)?;
        let loss = batch_loss(model, &batch, &mut ForwardContext::eval())?;
        sum_nll += loss.sum_nll.detach().to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        n_correct += loss.n_correct;
        n_targets += batch.n_targets;
    }
    let n_targets = n_targets.max(1) as f64;
    Ok((sum_nll / n_targets, n_correct as f64 / n_targets))
}

pub(crate) fn weights_file(approach: &Approach) -> &'static str {
    match approach {
        Approach::Lora(_) => lora::ADAPTER_WEIGHTS,
        Approach::Full => checkpoint::FULL_WEIGHTS,
    }
}

pub(crate) fn write_checkpoint(dir: &Path, job: &SftJob<'_>, model: &Llama, vars: &[(String, Var)], optimizer: &AdamW, state: &TrainerState) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir)?;
    let staging = checkpoint::staging(dir, state.step)?;
    match &job.approach {
        Approach::Lora(settings) => lora::save_adapter(model, settings, job.base_model_name, &staging)?,
        Approach::Full => checkpoint::write_full_weights(&staging, vars)?,
    }
    checkpoint::finish(&staging, dir, optimizer, state)
}

pub(crate) fn write_artifacts(job: &SftJob<'_>, model: &Llama, metadata: &FolderMetadata<'_>) -> Result<Vec<(ArtifactKind, PathBuf)>, TrainError> {
    let mut artifacts = Vec::new();
    match &job.approach {
        Approach::Lora(settings) => {
            let dir = job.output_dir.join(ArtifactKind::Adapter.as_str());
            lora::save_adapter(model, settings, job.base_model_name, &dir)?;
            artifacts.push((ArtifactKind::Adapter, dir));
            if job.export_merged {
                let dir = job.output_dir.join(ArtifactKind::Merged.as_str());
                save_model_folder(model, metadata, true, DEFAULT_MAX_SHARD_BYTES, &dir)?;
                artifacts.push((ArtifactKind::Merged, dir));
            }
        }
        Approach::Full => {
            let dir = job.output_dir.join(ArtifactKind::Model.as_str());
            save_model_folder(model, metadata, false, DEFAULT_MAX_SHARD_BYTES, &dir)?;
            artifacts.push((ArtifactKind::Model, dir));
        }
    }
    Ok(artifacts)
}
