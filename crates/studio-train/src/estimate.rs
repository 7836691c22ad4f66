//! A dry run: what a job would train, how many tokens and steps it takes, roughly how much
//! memory it needs, and optionally how long a real step takes. Supervised, DPO and
//! distillation jobs each count what their own run would process.

mod distill;
mod dpo;

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Var};
use serde::Serialize;
use studio_core::dataset::{Conversation, PreferencePair};

use crate::batch::{batch_loss, Batch};
use crate::chat::EncodedExample;
use crate::config::LlamaConfig;
use crate::data::{encode_examples, hold_out};
use crate::distill::DistillSettings;
use crate::loader::{load_model, LoadedModel};
use crate::lora;
use crate::model::{ForwardContext, Llama};
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::Rng;
use crate::run::{Approach, TrainObserver, TrainSettings, SUPERVISED_HYPERPARAMETERS};
use crate::steps::StepMethod;
use crate::TrainError;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// The job's method: `supervised`, `dpo` or `distillation`.
    pub method: &'static str,
    /// For distillation, the student's, after `student_layers`.
    pub trainable_parameters: u64,
    /// For distillation, the student's, after `student_layers`.
    pub total_parameters: u64,
    /// Trainable parameters as a percentage of the base model's.
    pub trainable_percent: f64,
    /// Training examples after the automatic hold-out, or preference pairs for DPO.
    pub examples: u64,
    /// Examples held out for validation when the job has no validation file. DPO holds out
    /// nothing.
    pub held_out_examples: u64,
    /// Examples with no target token within `max_seq_len`, or, for DPO, pairs whose replies are
    /// identical within it. Training drops both.
    pub dropped_examples: u64,
    /// Tokens of one epoch after truncation, padding excluded. A DPO pair counts its prompt
    /// twice, once before each reply, as its step processes it.
    pub tokens_per_epoch: u64,
    pub total_tokens: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    /// An estimate from a formula, not a measurement: weights, optimizer state and the
    /// activations of the largest micro-batch, in f32, plus a distillation teacher's weights and
    /// logits.
    pub estimated_peak_memory_bytes: u64,
    /// Median wall time of the measured steps, when steps were measured.
    pub seconds_per_step: Option<f64>,
    pub estimated_total_seconds: Option<f64>,
}

/// The counts of an estimate, before steps are derived and timed.
struct Counts {
    method: &'static str,
    total_parameters: u64,
    trainable_parameters: u64,
    /// Training items per epoch: examples, or preference pairs for DPO.
    examples: usize,
    held_out: usize,
    dropped: usize,
    tokens_per_epoch: u64,
    peak_memory_bytes: u64,
}

impl Estimate {
    /// Derives steps and totals from `counts` as the step loop plans them.
    fn from_counts(counts: Counts, settings: &TrainSettings, seconds_per_step: Option<f64>) -> Estimate {
        let items_per_step = settings.batch_size * settings.gradient_accumulation_steps;
        let steps_per_epoch = counts.examples.div_ceil(items_per_step.max(1)) as u64;
        let total_steps = steps_per_epoch * settings.n_epochs as u64;
        Estimate {
            method: counts.method,
            trainable_parameters: counts.trainable_parameters,
            total_parameters: counts.total_parameters,
            trainable_percent: 100.0 * counts.trainable_parameters as f64 / counts.total_parameters as f64,
            examples: counts.examples as u64,
            held_out_examples: counts.held_out as u64,
            dropped_examples: counts.dropped as u64,
            tokens_per_epoch: counts.tokens_per_epoch,
            total_tokens: counts.tokens_per_epoch * settings.n_epochs as u64,
            steps_per_epoch,
            total_steps,
            estimated_peak_memory_bytes: counts.peak_memory_bytes,
            seconds_per_step,
            estimated_total_seconds: seconds_per_step.map(|s| s * total_steps as f64),
        }
    }
}

/// A distillation teacher: a model file or folder, with the adapter of a teacher fine-tuned
/// with LoRA.
pub struct TeacherModel<'a> {
    pub path: &'a Path,
    pub adapter: Option<&'a Path>,
    /// The teacher's name in messages.
    pub name: &'a str,
}

/// The training data and settings of the job's method.
pub enum EstimateMethod<'a> {
    Supervised {
        conversations: &'a [Conversation],
    },
    Dpo {
        pairs: &'a [PreferencePair],
        /// Scales the log-probability ratios in the DPO loss.
        beta: f64,
    },
    Distillation {
        /// Conversations that end with the reference replies.
        conversations: &'a [Conversation],
        teacher: TeacherModel<'a>,
        distill: &'a DistillSettings,
        /// The name of the job's model, which the student is built from, in messages.
        student_name: &'a str,
    },
}

/// A job to estimate.
pub struct EstimateJob<'a> {
    /// A GGUF file or a Hugging Face model folder: the base model, or a distillation student's
    /// source.
    pub model_path: &'a Path,
    pub method: EstimateMethod<'a>,
    pub approach: &'a Approach,
    pub settings: &'a TrainSettings,
    /// True when the job has no validation file, so a supervised or distillation run holds out
    /// part of the training set as [`run_sft`](crate::run_sft) does.
    pub hold_out_validation: bool,
    /// Optimizer steps to time on the first training items, or 0 to time none. When there are
    /// several, the first is left out of the median as warm-up.
    pub measure_steps: usize,
}

/// Estimates a job by loading its model and encoding its training file as the run would.
pub fn estimate(job: &EstimateJob<'_>, observer: &mut dyn TrainObserver) -> Result<Estimate, TrainError> {
    match &job.method {
        EstimateMethod::Supervised { conversations } => estimate_supervised(job, conversations, observer),
        EstimateMethod::Dpo { pairs, beta } => dpo::estimate_dpo(job, pairs, *beta, observer),
        EstimateMethod::Distillation {
            conversations,
            teacher,
            distill,
            student_name,
        } => distill::estimate_distillation(job, conversations, teacher, distill, student_name, observer),
    }
}

/// Parameters of the model, counting a tied embedding and head once.
pub fn total_parameters(config: &LlamaConfig) -> u64 {
    let per_layer: usize = crate::config::LINEAR_MODULES
        .iter()
        .filter_map(|(_, module)| config.linear_shape(module))
        .map(|(fan_in, fan_out)| fan_in * fan_out)
        .sum::<usize>()
        + 2 * config.hidden_size
        + if config.attention_bias { config.num_attention_heads * config.head_dim + 2 * config.kv_dim() } else { 0 };
    let embedding = config.vocab_size * config.hidden_size;
    let head = if config.tie_word_embeddings { 0 } else { embedding };
    (per_layer * config.num_hidden_layers + embedding + head + config.hidden_size) as u64
}

pub fn trainable_parameters(config: &LlamaConfig, approach: &Approach) -> u64 {
    match approach {
        Approach::Lora(settings) => lora::trainable_parameters(config, settings) as u64,
        Approach::Full => total_parameters(config),
    }
}

/// Estimates the bytes of f32 activations kept for the backward pass of one micro-batch of
/// `rows` rows padded to `seq_len` with `targets` target tokens. The per-token constants count
/// the tensors the decoder keeps per layer (norms, projections, rotary products, SwiGLU) and
/// the attention tensors per head. The logits term allows for the head's output, its gradient
/// and the copies the loss's backward pass makes, so it errs on the high side.
pub fn activation_bytes(config: &LlamaConfig, rows: usize, seq_len: usize, targets: usize) -> u64 {
    let tokens = (rows * seq_len) as u64;
    let q_dim = (config.num_attention_heads * config.head_dim) as u64;
    let per_token_layer = 12 * config.hidden_size as u64 + 6 * q_dim + 4 * config.kv_dim() as u64 + 5 * config.intermediate_size as u64;
    let attention = 5 * (rows * config.num_attention_heads * seq_len * seq_len) as u64;
    let layers = config.num_hidden_layers as u64 * (tokens * per_token_layer + attention);
    let logits = 5 * (targets * config.vocab_size) as u64;
    4 * (layers + logits)
}

/// Bytes for weights, gradients and AdamW's two moments, in f32.
pub fn parameter_bytes(total: u64, trainable: u64) -> u64 {
    4 * (total + 3 * trainable)
}

fn estimate_supervised(
    job: &EstimateJob<'_>,
    conversations: &[Conversation],
    observer: &mut dyn TrainObserver,
) -> Result<Estimate, TrainError> {
    let device = Device::Cpu;
    let settings = job.settings;
    let loaded = load_model(job.model_path, &device)?;
    let max_seq_len_param = format!("{SUPERVISED_HYPERPARAMETERS}.max_seq_len");
    let split = encode_and_split(&loaded, conversations, job, &max_seq_len_param, observer)?;
    let config = &loaded.config;

    let total = total_parameters(config);
    let trainable = trainable_parameters(config, job.approach);
    let largest = MicroBatchShape::largest(&split.train, settings.batch_size);
    let memory = parameter_bytes(total, trainable) + largest.activation_bytes(config);

    let seconds_per_step = if job.measure_steps > 0 {
        Some(measure(&loaded, &split.train, job.approach, settings, job.measure_steps, &device)?)
    } else {
        None
    };
    let counts = Counts {
        method: "supervised",
        total_parameters: total,
        trainable_parameters: trainable,
        examples: split.train.len(),
        held_out: split.held_out,
        dropped: split.dropped,
        tokens_per_epoch: split.train.iter().map(|e| e.ids.len() as u64).sum(),
        peak_memory_bytes: memory,
    };
    Ok(Estimate::from_counts(counts, settings, seconds_per_step))
}

/// Training examples after encoding and the automatic hold-out.
struct ExampleSplit {
    train: Vec<EncodedExample>,
    held_out: usize,
    /// Conversations with no target token within `max_seq_len`.
    dropped: usize,
}

fn encode_and_split(
    loaded: &LoadedModel,
    conversations: &[Conversation],
    job: &EstimateJob<'_>,
    max_seq_len_param: &str,
    observer: &mut dyn TrainObserver,
) -> Result<ExampleSplit, TrainError> {
    let settings = job.settings;
    let encoded = encode_examples(loaded, conversations, settings.max_seq_len, max_seq_len_param, "training file", observer)?;
    let dropped = conversations.len() - encoded.len();
    let (train, held_out) = if job.hold_out_validation {
        hold_out(encoded, settings.seed)
    } else {
        (encoded, Vec::new())
    };
    Ok(ExampleSplit {
        train,
        held_out: held_out.len(),
        dropped,
    })
}

/// The size of one micro-batch, for [`activation_bytes`].
struct MicroBatchShape {
    rows: usize,
    /// The maximum row length, to which the other rows are padded.
    seq_len: usize,
    targets: usize,
}

impl MicroBatchShape {
    /// Returns the shape of the micro-batch of the `batch_size` longest examples.
    fn largest(examples: &[EncodedExample], batch_size: usize) -> MicroBatchShape {
        let mut by_length: Vec<&EncodedExample> = examples.iter().collect();
        by_length.sort_by_key(|e| std::cmp::Reverse(e.ids.len()));
        let largest: Vec<&EncodedExample> = by_length.into_iter().take(batch_size).collect();
        MicroBatchShape {
            rows: largest.len(),
            seq_len: largest.first().map_or(0, |e| e.ids.len()),
            targets: largest.iter().map(|e| e.n_targets()).sum(),
        }
    }

    fn activation_bytes(&self, config: &LlamaConfig) -> u64 {
        activation_bytes(config, self.rows, self.seq_len, self.targets)
    }
}

fn measure(
    loaded: &crate::loader::LoadedModel,
    examples: &[EncodedExample],
    approach: &Approach,
    settings: &TrainSettings,
    steps: usize,
    device: &Device,
) -> Result<f64, TrainError> {
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, device)?;
    let vars = match approach {
        Approach::Lora(lora_settings) => {
            lora::attach(&mut model, lora_settings, &mut Rng::new(settings.seed))?;
            model.lora_vars()
        }
        Approach::Full => model.make_all_trainable()?.into_iter().map(|(_, var)| var).collect(),
    };
    let mut optimizer = crate::optim::AdamW::new(vars, crate::optim::AdamWConfig::default())?;
    let rows: Vec<&EncodedExample> = examples.iter().take(settings.batch_size).collect();
    let batch = Batch::new(&rows, loaded.special.pad, device)?;
    let mut seconds = Vec::with_capacity(steps);
    for _ in 0..steps {
        let started = Instant::now();
        for _ in 0..settings.gradient_accumulation_steps {
            let loss = batch_loss(&model, &batch, &mut ForwardContext::eval())?;
            let grads = (loss.sum_nll / batch.n_targets as f64)?.backward()?;
            optimizer.step(&grads, 0.0)?;
        }
        seconds.push(started.elapsed().as_secs_f64());
    }
    Ok(median_after_warmup(seconds))
}

/// Makes the model's trained variables as a run of `approach` would, with adapters initialised
/// from `seed`.
fn attach_trainable(model: &mut Llama, approach: &Approach, seed: u64) -> Result<Vec<(String, Var)>, TrainError> {
    match approach {
        Approach::Lora(settings) => {
            lora::attach(model, settings, &mut Rng::new(seed))?;
            Ok(lora::adapter_vars(model))
        }
        Approach::Full => Ok(model.make_all_trainable()?),
    }
}

/// Times `steps` optimizer steps of `method` over training items `0..n_items` and returns the
/// median. The learning rate is 0, so the weights do not change between steps.
fn time_steps(
    method: &dyn StepMethod,
    vars: &[(String, Var)],
    n_items: usize,
    seed: u64,
    steps: usize,
) -> Result<f64, TrainError> {
    let mut optimizer = AdamW::new(vars.iter().map(|(_, var)| var.clone()).collect(), AdamWConfig::default())?;
    let indices: Vec<usize> = (0..n_items).collect();
    let mut rng = Rng::new(seed);
    let mut seconds = Vec::with_capacity(steps);
    for _ in 0..steps {
        let started = Instant::now();
        let gradients = method.gradients(&indices, &mut rng)?;
        optimizer.step_with(&gradients.grads, 0.0)?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    Ok(median_after_warmup(seconds))
}

/// Returns the median of `seconds`, leaving out the first as warm-up when there are several.
fn median_after_warmup(mut seconds: Vec<f64>) -> f64 {
    let timed = if seconds.len() > 1 { &mut seconds[1..] } else { &mut seconds[..] };
    timed.sort_by(f64::total_cmp);
    timed[timed.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::LoraSettings;

    /// SmolLM2-135M's architecture.
    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
        }
    }

    #[test]
    fn smollm2_parameter_counts() {
        let config = smollm2();
        assert_eq!(total_parameters(&config), 134_515_008);
        let lora = trainable_parameters(&config, &Approach::Lora(LoraSettings::default()));
        assert_eq!(lora, 921_600);
        let percent = 100.0 * lora as f64 / total_parameters(&config) as f64;
        assert!((percent - 0.685).abs() < 5e-4, "{percent}");
        let all_linear = LoraSettings { target_modules: vec!["all-linear".into()], ..LoraSettings::default() };
        // Per layer: 8 × (576+576) × 2 for q and o, 8 × (576+192) × 2 for k and v, and
        // 8 × (576+1536) × 3 for the MLP, so 81,408, times 30 layers.
        assert_eq!(trainable_parameters(&config, &Approach::Lora(all_linear)), 2_442_240);
    }
}
