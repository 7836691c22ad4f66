//! Loading a Llama-family model from a GGUF file: metadata to config, dequantized f32 weights
//! under Hugging Face names, the tokenizer and the chat template.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::LlamaConfig;
use crate::loader::{LoadedModel, SpecialTokens};
use crate::tokenizer::byte_level_bpe;
use crate::TrainError;

/// llama.cpp's token type for control tokens such as `<|im_start|>`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp's token type for user-defined tokens, which are matched whole as well.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

pub fn load(path: &Path, device: &Device) -> Result<LoadedModel, TrainError> {
    let load_error = |message: String| TrainError::ModelLoad {
        path: path.to_path_buf(),
        message,
    };
    let mut reader = BufReader::new(File::open(path).map_err(|err| load_error(err.to_string()))?);
    let content = Content::read(&mut reader).map_err(|err| load_error(err.to_string()))?;
    let metadata = Metadata(&content.metadata);

    let config = read_config(&metadata).map_err(load_error)?;
    let tokenizer = read_tokenizer(&metadata).map_err(load_error)?;
    let special = read_special_tokens(&metadata).map_err(load_error)?;
    let chat_template = metadata.string("tokenizer.chat_template").ok();

    let mut weights = HashMap::new();
    for gguf_name in content.tensor_infos.keys() {
        let Some(hf_name) = hugging_face_name(gguf_name) else {
            tracing::debug!(tensor = %gguf_name, "skipping GGUF tensor with no Hugging Face counterpart");
            continue;
        };
        let quantized = content
            .tensor(&mut reader, gguf_name, device)
            .map_err(|err| load_error(format!("tensor {gguf_name}: {err}")))?;
        let mut tensor = quantized.dequantize(device)?;
        if hf_name.ends_with("q_proj.weight") {
            tensor = unpermute_rows(&tensor, config.num_attention_heads)?;
        } else if hf_name.ends_with("k_proj.weight") {
            tensor = unpermute_rows(&tensor, config.num_key_value_heads)?;
        }
        weights.insert(hf_name, tensor);
    }
    let config = LlamaConfig {
        tie_word_embeddings: !weights.contains_key("lm_head.weight"),
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

/// Reads the config from the file's metadata and tensor list without loading any tensor.
pub fn read_config_only(path: &Path) -> Result<LlamaConfig, TrainError> {
    let load_error = |message: String| TrainError::ModelLoad {
        path: path.to_path_buf(),
        message,
    };
    let mut reader = BufReader::new(File::open(path).map_err(|err| load_error(err.to_string()))?);
    let content = Content::read(&mut reader).map_err(|err| load_error(err.to_string()))?;
    let config = read_config(&Metadata(&content.metadata)).map_err(load_error)?;
    Ok(LlamaConfig {
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        ..config
    })
}

/// Undoes llama.cpp's converter, which reorders the rows of each head of `q_proj` and `k_proj`
/// from halves (Hugging Face's rotary layout) to interleaved pairs. The converter reshapes to
/// `[n_head, 2, head_dim / 2, in]` and swaps axes 1 and 2; this applies the inverse.
fn unpermute_rows(weight: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    let half = rows / n_head / 2;
    weight
        .reshape((n_head, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Maps llama.cpp's tensor names to Hugging Face's.
fn hugging_face_name(gguf_name: &str) -> Option<String> {
    let top = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = top {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

fn read_config(metadata: &Metadata<'_>) -> Result<LlamaConfig, String> {
    let architecture = metadata.string("general.architecture")?;
    if !matches!(architecture.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(format!(
            "unsupported architecture {architecture:?}: the trainer supports llama, mistral and qwen2"
        ));
    }
    let key = |name: &str| format!("{architecture}.{name}");
    let hidden_size = metadata.usize(&key("embedding_length"))?;
    let num_attention_heads = metadata.usize(&key("attention.head_count"))?;
    let vocab_size = match metadata.usize(&key("vocab_size")) {
        Ok(size) => size,
        Err(_) => metadata.array("tokenizer.ggml.tokens")?.len(),
    };
    Ok(LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: metadata.usize(&key("feed_forward_length"))?,
        num_hidden_layers: metadata.usize(&key("block_count"))?,
        num_attention_heads,
        num_key_value_heads: metadata
            .usize(&key("attention.head_count_kv"))
            .unwrap_or(num_attention_heads),
        head_dim: metadata
            .usize(&key("rope.dimension_count"))
            .unwrap_or(hidden_size / num_attention_heads),
        rms_norm_eps: metadata.f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: metadata.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: metadata.usize(&key("context_length"))?,
        tie_word_embeddings: true,
        attention_bias: architecture == "qwen2",
    })
}

fn read_tokenizer(metadata: &Metadata<'_>) -> Result<tokenizers::Tokenizer, String> {
    let model = metadata.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(format!(
            "unsupported tokenizer model {model:?}: only byte-level BPE (\"gpt2\") is supported"
        ));
    }
    let tokens = metadata.strings("tokenizer.ggml.tokens")?;
    let merges = metadata.strings("tokenizer.ggml.merges")?;
    let types = metadata.array("tokenizer.ggml.token_type")?;
    let special: Vec<String> = tokens
        .iter()
        .zip(types)
        .filter(|(_, kind)| {
            matches!(kind.to_i32(), Ok(TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        })
        .map(|(token, _)| token.clone())
        .collect();
    let add_prefix_space = metadata
        .0
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|value| value.to_bool().ok())
        .unwrap_or(false);
    byte_level_bpe(&tokens, &merges, &special, add_prefix_space)
}

fn read_special_tokens(metadata: &Metadata<'_>) -> Result<SpecialTokens, String> {
    let eos = metadata.u32("tokenizer.ggml.eos_token_id")?;
    Ok(SpecialTokens {
        bos: metadata.u32("tokenizer.ggml.bos_token_id").ok(),
        eos,
        pad: metadata.u32("tokenizer.ggml.padding_token_id").unwrap_or(eos),
    })
}

/// Typed access to GGUF metadata with errors that name the key.
struct Metadata<'a>(&'a HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value, String> {
        self.0
            .get(key)
            .ok_or_else(|| format!("metadata key {key:?} is missing"))
    }

    fn usize(&self, key: &str) -> Result<usize, String> {
        let value = self.get(key)?;
        value
            .to_u64()
            .or_else(|_| value.to_u32().map(u64::from))
            .or_else(|_| value.to_i32().map(|v| v as u64))
            .map(|v| v as usize)
            .map_err(|err| format!("metadata key {key:?}: {err}"))
    }

    fn u32(&self, key: &str) -> Result<u32, String> {
        self.usize(key).map(|v| v as u32)
    }

    fn f64(&self, key: &str) -> Result<f64, String> {
        let value = self.get(key)?;
        value
            .to_f32()
            .map(f64::from)
            .or_else(|_| value.to_f64())
            .map_err(|err| format!("metadata key {key:?}: {err}"))
    }

    fn string(&self, key: &str) -> Result<String, String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|err| format!("metadata key {key:?}: {err}"))
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>, String> {
        self.get(key)?
            .to_vec()
            .map_err(|err| format!("metadata key {key:?}: {err}"))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, String> {
        self.array(key)?
            .iter()
            .map(|value| value.to_string().cloned())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("metadata key {key:?}: {err}"))
    }
}
