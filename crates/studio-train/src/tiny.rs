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
