//! Writing a model folder in Hugging Face layout, optionally with LoRA merged into the weights.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::config::LINEAR_MODULES;
use crate::hf;
use crate::loader::SpecialTokens;
use crate::model::{Linear, Llama};
use crate::TrainError;

/// `save_pretrained`'s default shard size in `transformers` 4.x and 5.x: 5 GB.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Tokenizer, chat template and special tokens written beside a model's weights.
pub struct FolderMetadata<'a> {
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub chat_template: Option<&'a str>,
    pub special: SpecialTokens,
}

/// Returns the model's weights under Hugging Face names. With `merge_lora`, each adapted linear
/// weight becomes `W + scale · B A`; the tied head is not written separately.
pub fn model_weights(model: &Llama, merge_lora: bool) -> Result<HashMap<String, Tensor>, TrainError> {
    let mut weights = HashMap::new();
    weights.insert("model.embed_tokens.weight".to_string(), model.embed_tokens.clone());
    weights.insert("model.norm.weight".to_string(), model.norm.clone());
    if !model.config.tie_word_embeddings {
        weights.insert("lm_head.weight".to_string(), model.lm_head.clone());
    }
    for (index, layer) in model.layers.iter().enumerate() {
        let prefix = format!("model.layers.{index}");
        weights.insert(format!("{prefix}.input_layernorm.weight"), layer.input_layernorm.clone());
        weights.insert(format!("{prefix}.post_attention_layernorm.weight"), layer.post_attention_layernorm.clone());
        for (parent, module) in LINEAR_MODULES {
            let linear = layer.linear(module).expect("module listed in LINEAR_MODULES");
            let name = format!("{prefix}.{parent}.{module}");
            weights.insert(format!("{name}.weight"), linear_weight(linear, merge_lora)?);
            if let Some(bias) = &linear.bias {
                weights.insert(format!("{name}.bias"), bias.clone());
            }
        }
    }
    Ok(weights)
}

fn linear_weight(linear: &Linear, merge_lora: bool) -> Result<Tensor, TrainError> {
    let weight = linear.weight.detach();
    match (&linear.lora, merge_lora) {
        (Some(lora), true) => {
            let delta = (lora.b.as_tensor().matmul(lora.a.as_tensor())? * lora.scale)?;
            Ok((weight + delta)?)
        }
        _ => Ok(weight),
    }
}

/// Builds the `config.json` of a Llama-family model. `rope_theta` is written at the top level and under
/// `rope_parameters`, so older and newer `transformers` both read it.
pub fn config_json(model: &Llama, special: SpecialTokens) -> Value {
    let c = &model.config;
    let model_type = if c.attention_bias { "qwen2" } else { "llama" };
    let architecture = if c.attention_bias { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" };
    json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": { "rope_theta": c.rope_theta, "rope_type": "default" },
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "mlp_bias": false,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "torch_dtype": "float32",
        "dtype": "float32",
    })
}

/// Writes a complete model folder in f32: `config.json`, `generation_config.json`, the weights
/// (`model.safetensors`, or shards with `model.safetensors.index.json` above `max_shard_bytes`),
/// `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`.
///
/// The folder is assembled under a temporary name beside `dir` and renamed when whole, so a
/// reader never sees a partial model. An existing `dir` is replaced.
pub fn save_model_folder(
    model: &Llama,
    metadata: &FolderMetadata<'_>,
    merge_lora: bool,
    max_shard_bytes: usize,
    dir: &Path,
) -> Result<(), TrainError> {
    let staging = staging_dir(dir);
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;

    let mut weights = model_weights(model, merge_lora)?;
    for (name, tensor) in weights.iter_mut() {
        *tensor = tensor.to_dtype(DType::F32)?;
        let max = tensor.abs()?.max_all()?.to_scalar::<f32>()?;
        if !max.is_finite() {
            return Err(TrainError::NonFinite(format!("weight {name} contains a non-finite value")));
        }
    }
    write_weights(&weights, max_shard_bytes, &staging)?;
    write_json(&staging.join(hf::CONFIG), &config_json(model, metadata.special))?;
    write_json(&staging.join(hf::GENERATION_CONFIG), &json!({
        "bos_token_id": metadata.special.bos,
        "eos_token_id": metadata.special.eos,
        "pad_token_id": metadata.special.pad,
    }))?;
    write_tokenizer(metadata, &staging)?;

    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::rename(&staging, dir)?;
    Ok(())
}

fn staging_dir(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!(".{name}.partial"))
}

fn write_json(path: &Path, value: &Value) -> Result<(), TrainError> {
    fs::write(path, serde_json::to_vec_pretty(value).expect("JSON value serialises"))?;
    Ok(())
}

fn write_weights(weights: &HashMap<String, Tensor>, max_shard_bytes: usize, dir: &Path) -> Result<(), TrainError> {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    for name in names {
        let bytes = weights[name].elem_count() * 4;
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shards.last_mut().expect("at least one shard").push(name);
        shard_bytes += bytes;
    }

    if shards.len() == 1 {
        candle_core::safetensors::save(weights, dir.join(hf::WEIGHTS))?;
        return Ok(());
    }
    let mut weight_map = serde_json::Map::new();
    let total: usize = weights.values().map(|t| t.elem_count() * 4).sum();
    for (index, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", index + 1, shards.len());
        let tensors: HashMap<&str, Tensor> = shard.iter().map(|name| (name.as_str(), weights[*name].clone())).collect();
        candle_core::safetensors::save(&tensors, dir.join(&file))?;
        for name in shard {
            weight_map.insert((*name).clone(), Value::String(file.clone()));
        }
    }
    write_json(&dir.join(hf::WEIGHTS_INDEX), &json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    }))
}

fn write_tokenizer(metadata: &FolderMetadata<'_>, dir: &Path) -> Result<(), TrainError> {
    let token = |id: Option<u32>| id.and_then(|id| metadata.tokenizer.id_to_token(id));
    metadata
        .tokenizer
        .save(dir.join(hf::TOKENIZER), false)
        .map_err(|err| TrainError::Io(std::io::Error::other(format!("saving {}: {err}", hf::TOKENIZER))))?;
    let mut tokenizer_config = json!({
        "bos_token": token(metadata.special.bos),
        "eos_token": token(Some(metadata.special.eos)),
        "pad_token": token(Some(metadata.special.pad)),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1_000_000_000_000_000_000u64,
    });
    if let Some(template) = metadata.chat_template {
        // Older transformers read the template from here, newer ones from chat_template.jinja.
        tokenizer_config["chat_template"] = Value::String(template.to_string());
        fs::write(dir.join(hf::CHAT_TEMPLATE), template)?;
    }
    write_json(&dir.join(hf::TOKENIZER_CONFIG), &tokenizer_config)
}
