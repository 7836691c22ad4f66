//! Loading a model from a Hugging Face folder: `config.json`, `model.safetensors` (or shards
//! listed in `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`, and
//! the chat template from `chat_template.jinja` (newer `transformers`) or
//! `tokenizer_config.json` (older ones).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::loader::{LoadedModel, SpecialTokens};
use crate::TrainError;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";
pub const GENERATION_CONFIG: &str = "generation_config.json";

pub fn load(dir: &Path, device: &Device) -> Result<LoadedModel, TrainError> {
    let load_error = |message: String| TrainError::ModelLoad {
        path: dir.to_path_buf(),
        message,
    };
    let config_json = read_json(&dir.join(CONFIG)).map_err(load_error)?;
    let config = parse_config(&config_json).map_err(load_error)?;
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join(TOKENIZER))
        .map_err(|err| load_error(format!("{TOKENIZER}: {err}")))?;
    let tokenizer_config = read_json(&dir.join(TOKENIZER_CONFIG)).unwrap_or(Value::Null);
    let chat_template = read_chat_template(dir, &tokenizer_config);
    let special = special_tokens(&config_json, &tokenizer_config, &tokenizer).map_err(load_error)?;
    let weights = read_weights(dir, device).map_err(load_error)?;
    let config = LlamaConfig {
        tie_word_embeddings: config.tie_word_embeddings || !weights.contains_key("lm_head.weight"),
        ..config
    };
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template,
        special,
    })
}

/// Reads `config.json` alone. `tie_word_embeddings` is the file's flag, so it is false for a
/// folder that sets no flag but lacks `lm_head.weight`, where [`load`] sets it to true.
pub fn read_config_only(dir: &Path) -> Result<LlamaConfig, TrainError> {
    let load_error = |message: String| TrainError::ModelLoad {
        path: dir.to_path_buf(),
        message,
    };
    let config_json = read_json(&dir.join(CONFIG)).map_err(load_error)?;
    parse_config(&config_json).map_err(load_error)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    serde_json::from_str(&text).map_err(|err| format!("{}: invalid JSON: {err}", path.display()))
}

/// Reads a Llama, Mistral or Qwen2 `config.json`. `rope_theta` sits at the top level in older
/// `transformers` and under `rope_parameters` in newer ones.
pub fn parse_config(json: &Value) -> Result<LlamaConfig, String> {
    let model_type = json["model_type"].as_str().unwrap_or("llama");
    if !matches!(model_type, "llama" | "mistral" | "qwen2") {
        return Err(format!(
            "unsupported model_type {model_type:?}: the trainer supports llama, mistral and qwen2"
        ));
    }
    let usize_field = |name: &str| -> Result<usize, String> {
        json[name]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("{CONFIG}: {name} is missing or not an integer"))
    };
    let hidden_size = usize_field("hidden_size")?;
    let num_attention_heads = usize_field("num_attention_heads")?;
    let rope_theta = json["rope_parameters"]["rope_theta"]
        .as_f64()
        .or_else(|| json["rope_theta"].as_f64())
        .unwrap_or(10_000.0);
    Ok(LlamaConfig {
        vocab_size: usize_field("vocab_size")?,
        hidden_size,
        intermediate_size: usize_field("intermediate_size")?,
        num_hidden_layers: usize_field("num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads: usize_field("num_key_value_heads").unwrap_or(num_attention_heads),
        head_dim: usize_field("head_dim").unwrap_or(hidden_size / num_attention_heads),
        rms_norm_eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        rope_theta,
        max_position_embeddings: usize_field("max_position_embeddings").unwrap_or(4096),
        tie_word_embeddings: json["tie_word_embeddings"].as_bool().unwrap_or(false),
        attention_bias: model_type == "qwen2" || json["attention_bias"].as_bool().unwrap_or(false),
    })
}

fn read_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>, String> {
    let index_path = dir.join(WEIGHTS_INDEX);
    let files: Vec<String> = if index_path.is_file() {
        let index = read_json(&index_path)?;
        let map = index["weight_map"]
            .as_object()
            .ok_or_else(|| format!("{WEIGHTS_INDEX}: weight_map is missing"))?;
        let shards: BTreeSet<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        shards.into_iter().collect()
    } else {
        vec![WEIGHTS.to_string()]
    };
    let mut weights = HashMap::new();
    for file in files {
        let path = dir.join(&file);
        let tensors = candle_core::safetensors::load(&path, device).map_err(|err| format!("{}: {err}", path.display()))?;
        for (name, tensor) in tensors {
            let tensor = tensor.to_dtype(DType::F32).map_err(|err| format!("{name}: {err}"))?;
            weights.insert(name, tensor);
        }
    }
    Ok(weights)
}

fn read_chat_template(dir: &Path, tokenizer_config: &Value) -> Option<String> {
    if let Ok(template) = fs::read_to_string(dir.join(CHAT_TEMPLATE)) {
        return Some(template);
    }
    match &tokenizer_config["chat_template"] {
        Value::String(template) => Some(template.clone()),
        // Some tokenizers list several named templates; "default" is the chat one.
        Value::Array(templates) => templates
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str().map(String::from)),
        _ => None,
    }
}

/// Resolves the end-of-turn, BOS and padding ids from the token strings in
/// `tokenizer_config.json`, falling back to the ids in `config.json`.
fn special_tokens(config: &Value, tokenizer_config: &Value, tokenizer: &tokenizers::Tokenizer) -> Result<SpecialTokens, String> {
    let token_id = |key: &str| -> Option<u32> {
        let value = &tokenizer_config[key];
        let text = value.as_str().or_else(|| value["content"].as_str())?;
        tokenizer.token_to_id(text)
    };
    let config_id = |key: &str| -> Option<u32> {
        let value = &config[key];
        value.as_u64().or_else(|| value.get(0).and_then(Value::as_u64)).map(|v| v as u32)
    };
    let eos = token_id("eos_token")
        .or_else(|| config_id("eos_token_id"))
        .ok_or_else(|| "no eos_token in tokenizer_config.json and no eos_token_id in config.json".to_string())?;
    Ok(SpecialTokens {
        bos: token_id("bos_token").or_else(|| config_id("bos_token_id")),
        eos,
        pad: token_id("pad_token").or_else(|| config_id("pad_token_id")).unwrap_or(eos),
    })
}
