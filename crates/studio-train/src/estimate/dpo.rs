//! The estimate of a DPO job, which trains on preference pairs.

use candle_core::Device;
use studio_core::dataset::PreferencePair;

use super::{activation_bytes, attach_trainable, parameter_bytes, time_steps, total_parameters, trainable_parameters};
use super::{Counts, Estimate, EstimateJob};
use crate::config::LlamaConfig;
use crate::dpo::{encode_pairs, reference_log_probs, DpoSteps, EncodedPair};
use crate::loader::{load_model, LoadedModel};
use crate::model::Llama;
use crate::run::{invalid, Approach, TrainObserver};
use crate::TrainError;

/// Estimates a DPO job as [`run_dpo`](crate::run_dpo) would run it. Its items are pairs after
/// truncation to `max_seq_len`, without the pairs whose replies are then identical. A step
/// scores two sequences per pair, the prompt plus the chosen reply and the prompt plus the
/// rejected reply, so a micro-batch has 2 × `batch_size` rows. DPO does not hold out a
/// validation set.
pub(super) fn estimate_dpo(
    job: &EstimateJob<'_>,
    pairs: &[PreferencePair],
    beta: f64,
    observer: &mut dyn TrainObserver,
) -> Result<Estimate, TrainError> {
    let device = Device::Cpu;
    let settings = job.settings;
    let loaded = load_model(job.model_path, &device)?;
    if pairs.is_empty() {
        return Err(invalid("the training file has no preference pairs", "training_file"));
    }
    let encoded = encode_pairs(&loaded, pairs, settings.max_seq_len, "training file", observer)?;
    let config = &loaded.config;

    let total = total_parameters(config);
    let trainable = trainable_parameters(config, job.approach);
    let memory = parameter_bytes(total, trainable) + pair_activation_bytes(config, &encoded, settings.batch_size);

    let seconds_per_step = if job.measure_steps > 0 {
        Some(measure_dpo(&loaded, &encoded, job, beta, &device)?)
    } else {
        None
    };
    let counts = Counts {
        method: "dpo",
        total_parameters: total,
        trainable_parameters: trainable,
        examples: encoded.len(),
        held_out: 0,
        dropped: pairs.len() - encoded.len(),
        tokens_per_epoch: encoded.iter().map(pair_tokens).sum(),
        peak_memory_bytes: memory,
    };
    Ok(Estimate::from_counts(counts, settings, seconds_per_step))
}

/// Tokens of both sequences of a pair: the prompt twice, once before each reply.
fn pair_tokens(pair: &EncodedPair) -> u64 {
    (2 * pair.prompt.len() + pair.chosen.len() + pair.rejected.len()) as u64
}

/// Estimates the activations of the micro-batch of the `batch_size` longest pairs: 2 rows per
/// pair, padded to the longest prompt plus reply, with both replies as targets. A LoRA run's
/// reference pass with the adapters off keeps no graph, and a full run computes its reference
/// before training, so neither adds to the peak.
fn pair_activation_bytes(config: &LlamaConfig, pairs: &[EncodedPair], batch_size: usize) -> u64 {
    let row_len = |pair: &EncodedPair| pair.prompt.len() + pair.chosen.len().max(pair.rejected.len());
    let mut by_length: Vec<&EncodedPair> = pairs.iter().collect();
    by_length.sort_by_key(|pair| std::cmp::Reverse(row_len(pair)));
    let largest: Vec<&EncodedPair> = by_length.into_iter().take(batch_size).collect();
    let seq_len = largest.first().map_or(0, |pair| row_len(pair));
    let targets: usize = largest.iter().map(|pair| pair.chosen.len() + pair.rejected.len()).sum();
    activation_bytes(config, 2 * largest.len(), seq_len, targets)
}

/// Times real DPO steps on the first pairs, at most one step's worth. A full fine-tuning run
/// computes its reference log-probabilities once before training, so that pass is not timed.
fn measure_dpo(
    loaded: &LoadedModel,
    pairs: &[EncodedPair],
    job: &EstimateJob<'_>,
    beta: f64,
    device: &Device,
) -> Result<f64, TrainError> {
    let settings = job.settings;
    let n_pairs = pairs.len().min(settings.batch_size * settings.gradient_accumulation_steps);
    let pad = loaded.special.pad;
    let mut model = Llama::from_weights(&loaded.config, &loaded.weights, device)?;
    let reference = match job.approach {
        Approach::Lora(_) => None,
        Approach::Full => Some(reference_log_probs(&model, &pairs[..n_pairs], settings.batch_size, pad)?),
    };
    let vars = attach_trainable(&mut model, job.approach, settings.seed)?;
    let method = DpoSteps {
        model: &model,
        vars: &vars,
        train: pairs,
        valid: &[],
        reference: reference.as_deref(),
        valid_reference: None,
        beta,
        batch_size: settings.batch_size,
        pad,
    };
    time_steps(&method, &vars, n_pairs, settings.seed, job.measure_steps)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use studio_core::dataset::{Message, Role};

    use super::*;
    use crate::estimate::{estimate, EstimateMethod};
    use crate::run::{LoraSettings, TrainSettings};
    use crate::tiny::SilentObserver;

    fn pair(prompt: &str, chosen: &str, rejected: &str) -> PreferencePair {
        PreferencePair {
            prompt: vec![Message { role: Role::User, content: prompt.into(), weight: None }],
            chosen: chosen.into(),
            rejected: rejected.into(),
        }
    }

    /// 24 pairs whose chosen replies grow by one byte each, so no two pairs are the same
    /// length, then one pair with identical replies.
    fn pairs() -> Vec<PreferencePair> {
        let mut pairs: Vec<PreferencePair> = (0..24).map(|i| pair(&format!("q{i}?"), &"y".repeat(i + 1), "n")).collect();
        pairs.push(pair("same?", "x", "x"));
        pairs
    }

    /// Counts the tiny model's tokens of `text`: its byte-level tokenizer has no merges, so each
    /// byte is a token, and each special token is one more.
    fn byte_level_tokens(text: &str) -> usize {
        let specials = text.matches("<|im_start|>").count() + text.matches("<|im_end|>").count();
        specials + text.replace("<|im_start|>", "").replace("<|im_end|>", "").len()
    }

    /// Returns the tiny model's ChatML rendering of one user turn with the generation prompt.
    fn rendered_prompt(prompt: &str) -> String {
        format!("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    }

    fn settings() -> TrainSettings {
        TrainSettings {
            n_epochs: 2,
            batch_size: 4,
            gradient_accumulation_steps: 2,
            ..TrainSettings::default()
        }
    }

    fn estimate_pairs(model: &Path, pairs: &[PreferencePair], approach: &Approach, measure_steps: usize) -> Estimate {
        let settings = settings();
        let job = EstimateJob {
            model_path: model,
            method: EstimateMethod::Dpo { pairs, beta: 0.1 },
            approach,
            settings: &settings,
            hold_out_validation: true,
            measure_steps,
        };
        estimate(&job, &mut SilentObserver).unwrap()
    }

    #[test]
    fn dpo_estimate_counts_pairs_and_both_sequences() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 3).unwrap();
        let pairs = pairs();
        let approach = Approach::Lora(LoraSettings::default());
        let estimate = estimate_pairs(dir.path(), &pairs, &approach, 0);

        // A reply is its bytes plus <|im_end|>.
        let trained = &pairs[..24];
        let expected_tokens: usize = trained
            .iter()
            .map(|p| 2 * byte_level_tokens(&rendered_prompt(&p.prompt[0].content)) + p.chosen.len() + 1 + p.rejected.len() + 1)
            .sum();
        assert_eq!(estimate.method, "dpo");
        assert_eq!(estimate.examples, 24);
        assert_eq!(estimate.held_out_examples, 0, "DPO holds nothing out, even from 24 pairs");
        assert_eq!(estimate.dropped_examples, 1, "the pair with identical replies is dropped");
        assert_eq!(estimate.tokens_per_epoch, expected_tokens as u64);
        assert_eq!(estimate.total_tokens, 2 * expected_tokens as u64);
        // 8 pairs a step: 24 / 8.
        assert_eq!(estimate.steps_per_epoch, 3);
        assert_eq!(estimate.total_steps, 6);
        assert_eq!(estimate.seconds_per_step, None);

        // The 4 longest pairs are the last 4, each scored as 2 rows padded to the longest.
        let loaded = load_model(dir.path(), &Device::Cpu).unwrap();
        let config = &loaded.config;
        let longest = &trained[20..];
        let seq_len = byte_level_tokens(&rendered_prompt(&longest[3].prompt[0].content)) + longest[3].chosen.len() + 1;
        let targets: usize = longest.iter().map(|p| p.chosen.len() + 1 + p.rejected.len() + 1).sum();
        let trainable = trainable_parameters(config, &approach);
        let expected_memory = parameter_bytes(total_parameters(config), trainable) + activation_bytes(config, 8, seq_len, targets);
        assert_eq!(estimate.trainable_parameters, trainable);
        assert_eq!(estimate.estimated_peak_memory_bytes, expected_memory);
    }

    #[test]
    fn dpo_estimate_times_lora_and_full_steps() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 4).unwrap();
        let pairs = pairs();
        for approach in [Approach::Lora(LoraSettings::default()), Approach::Full] {
            let estimate = estimate_pairs(dir.path(), &pairs, &approach, 2);

            let seconds = estimate.seconds_per_step.unwrap_or_else(|| panic!("{approach:?}: no step time"));
            assert!(seconds > 0.0, "{approach:?}: {seconds}");
            assert_eq!(estimate.estimated_total_seconds, Some(seconds * 6.0), "{approach:?}");
        }
    }
}
