//! A dry run: what a job would train, how many tokens and steps it takes, roughly how much
//! memory it needs, and optionally how long a real step takes.

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;
use studio_core::dataset::Conversation;

use crate::batch::{batch_loss, Batch};
use crate::chat::EncodedExample;
use crate::config::LlamaConfig;
use crate::data::{encode_examples, hold_out};
use crate::loader::load_model;
use crate::lora;
use crate::model::{ForwardContext, Llama};
use crate::rng::Rng;
use crate::run::{Approach, TrainObserver, TrainSettings, SUPERVISED_HYPERPARAMETERS};
use crate::TrainError;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub trainable_parameters: u64,
    pub total_parameters: u64,
    /// Trainable parameters as a percentage of the base model's.
    pub trainable_percent: f64,
    /// Training examples, after the automatic hold-out.
    pub examples: u64,
    /// Examples held out for validation when the job has no validation file.
    pub held_out_examples: u64,
    /// Examples with no target token within `max_seq_len`, which training drops.
    pub dropped_examples: u64,
    /// Tokens of one epoch after truncation, padding excluded.
    pub tokens_per_epoch: u64,
    pub total_tokens: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    /// An estimate from a formula, not a measurement: weights, optimizer state and the
    /// activations of the largest micro-batch, in f32.
    pub estimated_peak_memory_bytes: u64,
    /// Median wall time of the measured steps, when steps were measured.
    pub seconds_per_step: Option<f64>,
    pub estimated_total_seconds: Option<f64>,
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

/// Estimates a job. `hold_out_validation` is true when the job has no validation file, so the
/// run would hold out part of the training set as [`run_sft`](crate::run_sft) does. With
/// `measure_steps > 0`, it also times that many optimizer steps on the first examples. When
/// there are several, the first is left out of the median as warm-up.
pub fn estimate(
    model_path: &Path,
    conversations: &[Conversation],
    approach: &Approach,
    settings: &TrainSettings,
    hold_out_validation: bool,
    measure_steps: usize,
    observer: &mut dyn TrainObserver,
) -> Result<Estimate, TrainError> {
    let device = Device::Cpu;
    let loaded = load_model(model_path, &device)?;
    let max_seq_len_param = format!("{SUPERVISED_HYPERPARAMETERS}.max_seq_len");
    let encoded = encode_examples(&loaded, conversations, settings.max_seq_len, &max_seq_len_param, "training file", observer)?;
    let encoded_count = encoded.len();
    let (examples, held_out) = if hold_out_validation {
        hold_out(encoded, settings.seed)
    } else {
        (encoded, Vec::new())
    };
    let config = &loaded.config;

    let total = total_parameters(config);
    let trainable = trainable_parameters(config, approach);
    let examples_per_step = settings.batch_size * settings.gradient_accumulation_steps;
    let steps_per_epoch = examples.len().div_ceil(examples_per_step.max(1)) as u64;
    let tokens_per_epoch: u64 = examples.iter().map(|e| e.ids.len() as u64).sum();

    let mut by_length: Vec<&EncodedExample> = examples.iter().collect();
    by_length.sort_by_key(|e| std::cmp::Reverse(e.ids.len()));
    let largest: Vec<&EncodedExample> = by_length.into_iter().take(settings.batch_size).collect();
    let seq_len = largest.first().map_or(0, |e| e.ids.len());
    let targets: usize = largest.iter().map(|e| e.n_targets()).sum();
    let memory = parameter_bytes(total, trainable) + activation_bytes(config, largest.len(), seq_len, targets);

    let seconds_per_step = if measure_steps > 0 {
        Some(measure(&loaded, &examples, approach, settings, measure_steps, &device)?)
    } else {
        None
    };
    let total_steps = steps_per_epoch * settings.n_epochs as u64;
    Ok(Estimate {
        trainable_parameters: trainable,
        total_parameters: total,
        trainable_percent: 100.0 * trainable as f64 / total as f64,
        examples: examples.len() as u64,
        held_out_examples: held_out.len() as u64,
        dropped_examples: (conversations.len() - encoded_count) as u64,
        tokens_per_epoch,
        total_tokens: tokens_per_epoch * settings.n_epochs as u64,
        steps_per_epoch,
        total_steps,
        estimated_peak_memory_bytes: memory,
        seconds_per_step,
        estimated_total_seconds: seconds_per_step.map(|s| s * total_steps as f64),
    })
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
    let timed = if seconds.len() > 1 { &mut seconds[1..] } else { &mut seconds[..] };
    timed.sort_by(f64::total_cmp);
    Ok(timed[timed.len() / 2])
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
