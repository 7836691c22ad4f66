//! Tiny random Llama-family models for tests: a few thousand parameters, any dtype.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{LlamaConfig, LINEAR_MODULES};
use crate::rng::Rng;

/// Architectures the trainer supports, as tiny configurations.
pub fn tiny_config(model_type: &str) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 48,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: if model_type == "llama" { 4 } else { 2 },
        head_dim: 4,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: model_type == "llama",
        attention_bias: model_type == "qwen2",
    }
}

/// Random weights under Hugging Face names, drawn from U(-0.5, 0.5) (norms around 1).
pub fn tiny_weights(config: &LlamaConfig, seed: u64, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let device = Device::Cpu;
    let mut random = |shape: &[usize], center: f32| -> Result<Tensor> {
        let count = shape.iter().product();
        let values: Vec<f32> = rng.uniform_vec(count, center - 0.5, center + 0.5);
        Tensor::from_vec(values, shape, &device)?.to_dtype(dtype)
    };
    let mut weights = HashMap::new();
    let (hidden, vocab) = (config.hidden_size, config.vocab_size);
    weights.insert("model.embed_tokens.weight".to_string(), random(&[vocab, hidden], 0.0)?);
    weights.insert("model.norm.weight".to_string(), random(&[hidden], 1.0)?);
    if !config.tie_word_embeddings {
        weights.insert("lm_head.weight".to_string(), random(&[vocab, hidden], 0.0)?);
    }
    for layer in 0..config.num_hidden_layers {
        let prefix = format!("model.layers.{layer}");
        weights.insert(format!("{prefix}.input_layernorm.weight"), random(&[hidden], 1.0)?);
        weights.insert(format!("{prefix}.post_attention_layernorm.weight"), random(&[hidden], 1.0)?);
        for (parent, module) in LINEAR_MODULES {
            let (fan_in, fan_out) = config.linear_shape(module).expect("listed module");
            let name = format!("{prefix}.{parent}.{module}");
            weights.insert(format!("{name}.weight"), random(&[fan_out, fan_in], 0.0)?);
            if config.attention_bias && matches!(module, "q_proj" | "k_proj" | "v_proj") {
                weights.insert(format!("{name}.bias"), random(&[fan_out], 0.0)?);
            }
        }
    }
    Ok(weights)
}

/// The chat template of SmolLM2, used by tiny test models.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes a tiny random model as a complete Hugging Face folder, so the whole training loop runs
/// on it in milliseconds. The folder has f32 weights, a ChatML template and a byte-level
/// tokenizer with no merges: every byte is a token, then `<|im_start|>` and `<|im_end|>`.
pub fn write_tiny_model_folder(dir: &std::path::Path, model_type: &str, seed: u64) -> Result<()> {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = alphabet.iter().map(char::to_string).collect();
    let special = vec!["<|im_start|>".to_string(), "<|im_end|>".to_string()];
    tokens.extend(special.iter().cloned());
    let tokenizer = crate::tokenizer::byte_level_bpe(&tokens, &[], &special, false).map_err(candle_core::Error::Msg)?;

    let config = LlamaConfig {
        vocab_size: tokens.len(),
        ..tiny_config(model_type)
    };
    let weights = tiny_weights(&config, seed, DType::F32)?;
    let model = crate::model::Llama::from_weights(&config, &weights, &Device::Cpu)?;
    let eos = tokens.len() as u32 - 1;
    let metadata = crate::export::FolderMetadata {
        tokenizer: &tokenizer,
        chat_template: Some(CHATML_TEMPLATE),
        special: crate::loader::SpecialTokens { bos: Some(eos - 1), eos, pad: eos },
    };
    crate::export::save_model_folder(&model, &metadata, false, crate::export::DEFAULT_MAX_SHARD_BYTES, dir)
        .map_err(|err| candle_core::Error::Msg(err.to_string()))
}

/// An observer that records nothing and never stops a run, for tests.
#[cfg(test)]
pub(crate) struct SilentObserver;

#[cfg(test)]
impl crate::TrainObserver for SilentObserver {
    fn on_step(&mut self, _metrics: &crate::StepMetrics) {}

    fn on_event(&mut self, _level: crate::EventLevel, _message: &str) {}

    fn stop_request(&mut self) -> Option<crate::StopRequest> {
        None
    }
}

/// Eight short conversations whose replies count from 0 to the number in the request, for tests
/// on tiny models.
#[cfg(test)]
pub(crate) fn counting_conversations() -> Vec<studio_core::dataset::Conversation> {
    use studio_core::dataset::{Conversation, Message, Role};
    (0..8)
        .map(|i| Conversation {
            messages: vec![
                Message { role: Role::User, content: format!("count to {i}"), weight: None },
                Message { role: Role::Assistant, content: (0..=i).map(|n| n.to_string()).collect::<Vec<_>>().join(" "), weight: None },
            ],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{batch_loss, Batch};
    use crate::chat::EncodedExample;
    use crate::lora;
    use crate::model::{ForwardContext, Llama};
    use crate::run::LoraSettings;
    use candle_core::Var;

    fn example(length: usize, offset: u32) -> EncodedExample {
        EncodedExample {
            ids: (0..length as u32).map(|i| (i * 7 + offset) % 48).collect(),
            targets: (0..length).map(|i| i >= length / 3).collect(),
        }
    }

    fn loss(model: &Llama, examples: &[&EncodedExample]) -> Tensor {
        let batch = Batch::new(examples, 0, &Device::Cpu).unwrap();
        let loss = batch_loss(model, &batch, &mut ForwardContext::eval()).unwrap();
        (loss.sum_nll / batch.n_targets as f64).unwrap()
    }

    fn value(tensor: &Tensor) -> f64 {
        tensor.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// Compares autograd with central differences at a few coordinates of each variable.
    fn check_gradients(model: &Llama, vars: &[(String, Var)]) {
        let (first, second) = (example(9, 1), example(6, 5));
        let examples = [&first, &second];
        let grads = loss(model, &examples).backward().unwrap();
        let step = 1e-6;
        for (name, var) in vars {
            let grad = grads.get(var).unwrap_or_else(|| panic!("{name} received no gradient"));
            let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let original: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            for index in [0, original.len() / 2, original.len() - 1] {
                let mut shifted = original.clone();
                shifted[index] += step;
                var.set(&Tensor::from_vec(shifted.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let plus = value(&loss(model, &examples));
                shifted[index] -= 2.0 * step;
                var.set(&Tensor::from_vec(shifted, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let minus = value(&loss(model, &examples));
                var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();

                let numeric = (plus - minus) / (2.0 * step);
                let tolerance = 1e-5 + 1e-4 * numeric.abs();
                assert!(
                    (grad[index] - numeric).abs() < tolerance,
                    "{name}[{index}]: autograd {} vs finite difference {numeric}",
                    grad[index]
                );
            }
        }
    }

    fn tiny_model(model_type: &str) -> Llama {
        let config = tiny_config(model_type);
        let weights = tiny_weights(&config, 11, DType::F64).unwrap();
        Llama::from_weights(&config, &weights, &Device::Cpu).unwrap()
    }

    #[test]
    fn full_gradients_match_finite_differences() {
        for model_type in ["llama", "mistral", "qwen2"] {
            let mut model = tiny_model(model_type);
            let vars = model.make_all_trainable().unwrap();
            let has_bias = vars.iter().any(|(name, _)| name.ends_with("q_proj.bias"));
            assert_eq!(has_bias, model_type == "qwen2", "{model_type} q_proj bias");
            check_gradients(&model, &vars);
        }
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let mut model = tiny_model("mistral");
        let settings = LoraSettings {
            r: 2,
            alpha: 4.0,
            target_modules: ["q_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
            ..LoraSettings::default()
        };
        lora::attach(&mut model, &settings, &mut Rng::new(3)).unwrap();
        // B starts at zero; give it values so A's gradient is not zero by construction.
        let mut rng = Rng::new(4);
        for var in model.lora_vars() {
            let values: Vec<f64> = rng.uniform_vec(var.elem_count(), -0.3, 0.3).into_iter().map(f64::from).collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let named = lora::adapter_vars(&model);
        assert_eq!(named.len(), 2 * 3 * 2, "A and B for three modules in two layers");
        check_gradients(&model, &named);
    }

    #[test]
    fn folder_roundtrip_keeps_logits() {
        let tokenizer = crate::tokenizer::byte_level_bpe(
            &(0..48).map(|i| format!("t{i}")).collect::<Vec<_>>(),
            &[],
            &[],
            false,
        )
        .unwrap();
        let special = crate::loader::SpecialTokens { bos: Some(1), eos: 2, pad: 2 };
        for model_type in ["llama", "mistral", "qwen2"] {
            let model = tiny_model(model_type);
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join(model_type);
            let metadata = crate::export::FolderMetadata { tokenizer: &tokenizer, chat_template: Some("{{ messages }}"), special };
            // A tiny shard limit forces an index with several shards.
            crate::export::save_model_folder(&model, &metadata, false, 4_000, &dir).unwrap();
            assert!(dir.join(crate::hf::WEIGHTS_INDEX).is_file(), "{model_type}: shard index");

            let loaded = crate::loader::load_model(&dir, &Device::Cpu).unwrap();
            assert_eq!(loaded.config, model.config, "{model_type}: config");
            assert_eq!(loaded.special, special, "{model_type}: special tokens");
            assert_eq!(loaded.chat_template.as_deref(), Some("{{ messages }}"));
            let reloaded = Llama::from_weights(&loaded.config, &loaded.weights, &Device::Cpu).unwrap();
            let before = value(&loss(&model, &[&example(9, 1)]));
            let after = value(&loss(&reloaded, &[&example(9, 1)]));
            // The folder stores f32, so the f64 model's loss survives to f32 precision.
            assert!((before - after).abs() < 1e-5, "{model_type}: loss {before} became {after}");
        }
    }
}

#[cfg(test)]
mod run_tests {
    use std::path::Path;

    use studio_core::dataset::{Conversation, Message, Role};

    use super::write_tiny_model_folder;
    use crate::{run_sft, Approach, ArtifactKind, CheckpointInfo, EventLevel, LoraSettings, RunOutcome, SftJob, StepMetrics, StopRequest, TrainObserver, TrainSettings};

    #[derive(Default)]
    struct Recorder {
        steps: Vec<StepMetrics>,
        checkpoints: Vec<CheckpointInfo>,
        events: Vec<String>,
        /// Stop the run this way once this many steps are done.
        stop_after: Option<(u64, StopRequest)>,
    }

    impl TrainObserver for Recorder {
        fn on_step(&mut self, metrics: &StepMetrics) {
            self.steps.push(metrics.clone());
        }
        fn on_event(&mut self, _level: EventLevel, message: &str) {
            self.events.push(message.to_string());
        }
        fn stop_request(&mut self) -> Option<StopRequest> {
            self.stop_after.filter(|&(n, _)| self.steps.len() as u64 >= n).map(|(_, request)| request)
        }
        fn on_checkpoint(&mut self, checkpoint: &CheckpointInfo) {
            self.checkpoints.push(checkpoint.clone());
        }
    }

    fn conversations(count: usize) -> Vec<Conversation> {
        (0..count)
            .map(|i| Conversation {
                messages: vec![
                    Message { role: Role::User, content: format!("question {i}?"), weight: None },
                    Message { role: Role::Assistant, content: format!("answer {} {}", i * 7 % 5, "ok".repeat(i % 3 + 1)), weight: None },
                ],
            })
            .collect()
    }

    fn settings() -> TrainSettings {
        TrainSettings {
            n_epochs: 2,
            batch_size: 4,
            learning_rate: 1e-2,
            warmup_ratio: 0.2,
            max_seq_len: 160,
            seed: 5,
            ..TrainSettings::default()
        }
    }

    fn lora_with_dropout() -> Approach {
        Approach::Lora(LoraSettings { dropout: 0.1, ..LoraSettings::default() })
    }

    struct Run {
        recorder: Recorder,
        outcome: RunOutcome,
    }

    fn run(model: &Path, out: &Path, approach: Approach, settings: TrainSettings, resume: Option<&Path>, stop_after: Option<(u64, StopRequest)>) -> Run {
        let examples = conversations(12);
        let job = SftJob {
            model_path: model,
            base_model_name: "tiny",
            examples: &examples,
            validation: Some(&examples[..3]),
            approach,
            settings,
            output_dir: &out.join("output"),
            checkpoint_dir: Some(&out.join("checkpoints")),
            resume_from: resume,
            export_merged: false,
        };
        let mut recorder = Recorder { stop_after, ..Recorder::default() };
        let outcome = run_sft(&job, &mut recorder).unwrap();
        Run { recorder, outcome }
    }

    fn artifact(outcome: &RunOutcome, kind: ArtifactKind, file: &str) -> Vec<(String, Vec<f32>)> {
        let RunOutcome::Succeeded(summary) = outcome else { panic!("run did not succeed: {outcome:?}") };
        let dir = &summary.artifacts.iter().find(|(k, _)| *k == kind).expect("artifact written").1;
        let tensors = candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu).unwrap();
        let mut values: Vec<(String, Vec<f32>)> = tensors
            .into_iter()
            .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        values
    }

    fn assert_same_tensors(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) {
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(b) {
            let max = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(max <= 1e-5, "{name} differs by {max}");
        }
    }

    #[test]
    fn resume_matches_uninterrupted_run() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("tiny");
        write_tiny_model_folder(&model, "mistral", 1).unwrap();
        // 3 steps an epoch. An abandoned run resumes from its planned checkpoint, and a suspended
        // one from the checkpoint it writes on stopping, at an epoch's end or in its middle.
        let cuts = [(3, StopRequest::Abandon, 2, 2), (3, StopRequest::Suspend, 0, 3), (4, StopRequest::Suspend, 0, 4)];
        let approaches = [(lora_with_dropout(), "adapter_model.safetensors"), (Approach::Full, "model.safetensors")];
        for ((approach, file), (stop_after, request, checkpoint_interval, resume_step)) in approaches.iter().flat_map(|a| cuts.iter().map(move |c| (a, *c))) {
            let kind = if *file == "model.safetensors" { ArtifactKind::Model } else { ArtifactKind::Adapter };
            let settings = TrainSettings { checkpoint_interval, ..settings() };
            let name = format!("{kind:?}-{request:?}-{stop_after}");

            let whole = run(&model, &root.path().join(format!("{name}-whole")), approach.clone(), settings.clone(), None, None);
            let cut_dir = root.path().join(format!("{name}-cut"));
            let cut = run(&model, &cut_dir, approach.clone(), settings.clone(), None, Some((stop_after, request)));
            assert_eq!(cut.outcome, RunOutcome::Stopped { steps: stop_after, request }, "{name}");
            let checkpoint = &cut.recorder.checkpoints.last().expect("a checkpoint before the cut").dir;
            assert!(checkpoint.ends_with(format!("step-{resume_step}")), "{name}: {}", checkpoint.display());

            let resumed = run(&model, &cut_dir, approach.clone(), settings.clone(), Some(checkpoint), None);
            let tail = &whole.recorder.steps[resume_step as usize..];
            assert_eq!(resumed.recorder.steps.len(), tail.len(), "steps after the checkpoint");
            for (a, b) in tail.iter().zip(&resumed.recorder.steps) {
                assert_eq!(a.step, b.step);
                assert!((a.train_loss - b.train_loss).abs() < 1e-5, "step {}: loss {} vs {}", a.step, a.train_loss, b.train_loss);
                assert!((a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm.max(1.0), "step {} gradient norm", a.step);
                assert_eq!(a.valid_loss.is_some(), b.valid_loss.is_some(), "step {} evaluation", a.step);
            }
            assert_same_tensors(&artifact(&whole.outcome, kind, file), &artifact(&resumed.outcome, kind, file));
        }
    }

    #[test]
    fn accumulation_matches_one_big_batch() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("tiny");
        write_tiny_model_folder(&model, "llama", 2).unwrap();
        let approach = Approach::Lora(LoraSettings::default());
        let big = TrainSettings { batch_size: 4, gradient_accumulation_steps: 1, ..settings() };
        let split = TrainSettings { batch_size: 1, gradient_accumulation_steps: 4, ..settings() };

        let a = run(&model, &root.path().join("big"), approach.clone(), big, None, None);
        let b = run(&model, &root.path().join("split"), approach, split, None, None);
        assert_eq!(a.recorder.steps.len(), b.recorder.steps.len());
        for (x, y) in a.recorder.steps.iter().zip(&b.recorder.steps) {
            assert!((x.train_loss - y.train_loss).abs() < 1e-5, "step {}: loss {} vs {}", x.step, x.train_loss, y.train_loss);
            assert!((x.grad_norm - y.grad_norm).abs() < 1e-5 * x.grad_norm.max(1.0), "step {}: gradient norm {} vs {}", x.step, x.grad_norm, y.grad_norm);
        }
        assert_same_tensors(
            &artifact(&a.outcome, ArtifactKind::Adapter, "adapter_model.safetensors"),
            &artifact(&b.outcome, ArtifactKind::Adapter, "adapter_model.safetensors"),
        );
    }

    #[test]
    fn evaluation_and_checkpoints_follow_settings() {
        let root = tempfile::tempdir().unwrap();
        let model = root.path().join("tiny");
        write_tiny_model_folder(&model, "qwen2", 3).unwrap();
        let settings = TrainSettings { eval_interval: 2, n_checkpoints: 2, ..settings() };
        let result = run(&model, root.path(), Approach::Lora(LoraSettings::default()), settings, None, None);

        // 12 examples, 4 a step: 3 steps an epoch, 6 in all.
        let evaluated: Vec<u64> = result.recorder.steps.iter().filter(|m| m.valid_loss.is_some()).map(|m| m.step).collect();
        assert_eq!(evaluated, vec![2, 3, 4, 6], "every second step and at each epoch end");
        let checkpoints: Vec<u64> = result.recorder.checkpoints.iter().map(|c| c.step).collect();
        assert_eq!(checkpoints, vec![3, 6]);
        let rates: Vec<f64> = result.recorder.steps.iter().map(|m| m.learning_rate).collect();
        // Two warmup steps (20% of 6, rounded up), then linear decay towards zero.
        let expected = [0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3];
        for (rate, expected) in rates.iter().zip(expected) {
            assert!((rate - expected).abs() < 1e-12, "learning rates {rates:?}");
        }
        let first = result.recorder.steps.first().unwrap().train_loss;
        let last = result.recorder.steps.last().unwrap().train_loss;
        assert!(last < first, "loss should fall on repeated data: {first} -> {last}");
    }
}
