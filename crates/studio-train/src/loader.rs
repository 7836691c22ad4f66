//! Model loading, whatever the file format: the trainer works on [`LoadedModel`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::config::LlamaConfig;
use crate::TrainError;

/// Token ids the trainer needs by role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    /// The end-of-turn token that closes each assistant reply (`<|im_end|>` for SmolLM2).
    pub eos: u32,
    pub pad: u32,
}

/// A base model in memory: f32 weights under Hugging Face names, plus what is needed to turn
/// conversations into token ids.
pub struct LoadedModel {
    pub config: LlamaConfig,
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: tokenizers::Tokenizer,
    /// The Jinja chat template, when the model ships one.
    pub chat_template: Option<String>,
    pub special: SpecialTokens,
}

/// Loads a base model from a GGUF file or a Hugging Face folder holding `config.json`.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel, TrainError> {
    let is_gguf = path.extension().is_some_and(|ext| ext == "gguf");
    if path.is_file() && is_gguf {
        return crate::gguf::load(path, device);
    }
    if path.is_dir() && path.join(crate::hf::CONFIG).is_file() {
        return crate::hf::load(path, device);
    }
    Err(not_a_model(path))
}

/// Reads the config of the model that [`load_model`] would load, without loading its weights,
/// so a request can be checked against the model's shape before any training starts.
pub fn read_config(path: &Path) -> Result<LlamaConfig, TrainError> {
    let is_gguf = path.extension().is_some_and(|ext| ext == "gguf");
    if path.is_file() && is_gguf {
        return crate::gguf::read_config_only(path);
    }
    if path.is_dir() && path.join(crate::hf::CONFIG).is_file() {
        return crate::hf::read_config_only(path);
    }
    Err(not_a_model(path))
}

fn not_a_model(path: &Path) -> TrainError {
    let message = if path.is_dir() {
        "the folder has no config.json, so it is not a Hugging Face model folder".to_string()
    } else if path.exists() {
        "expected a .gguf file or a Hugging Face model folder".to_string()
    } else {
        "no such file or folder".to_string()
    };
    TrainError::ModelLoad {
        path: path.to_path_buf(),
        message,
    }
}
