//! The architecture of a Llama-family decoder, in Hugging Face `config.json` terms.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections, as in Qwen2.
    pub attention_bias: bool,
}

impl LlamaConfig {
    /// Output width of `k_proj` and `v_proj`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Input and output widths of a linear module of one decoder layer.
    pub fn linear_shape(&self, module: &str) -> Option<(usize, usize)> {
        let hidden = self.hidden_size;
        let q_dim = self.num_attention_heads * self.head_dim;
        match module {
            "q_proj" => Some((hidden, q_dim)),
            "k_proj" | "v_proj" => Some((hidden, self.kv_dim())),
            "o_proj" => Some((q_dim, hidden)),
            "gate_proj" | "up_proj" => Some((hidden, self.intermediate_size)),
            "down_proj" => Some((self.intermediate_size, hidden)),
            _ => None,
        }
    }
}

/// The linear modules of a decoder layer, with their parent module in Hugging Face keys.
pub const LINEAR_MODULES: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];
