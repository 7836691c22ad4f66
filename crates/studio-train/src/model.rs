//! A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) built for training: RMSNorm, rotary
//! embeddings, grouped-query attention and a SwiGLU MLP from differentiable primitives, with
//! optional LoRA adapters on any linear module. Field names follow Hugging Face's keys.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor, Var};

use crate::config::LlamaConfig;
use crate::ops::{frozen_linear, rms_norm, rotate_half, softmax_last_dim};
use crate::rng::Rng;

/// A LoRA pair on one linear module: `y += scale · B A dropout(x)`.
pub struct LoraAdapter {
    /// `lora_A`, `[r, in]`.
    pub a: Var,
    /// `lora_B`, `[out, r]`.
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

pub struct Linear {
    /// `[out, in]`, Hugging Face layout.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

/// Per-call switches of a forward pass.
pub struct ForwardContext<'a> {
    /// Draws dropout masks; `None` disables dropout (evaluation).
    pub rng: Option<&'a mut Rng>,
    /// `false` runs the base model alone, ignoring the adapters.
    pub adapters_enabled: bool,
}

impl ForwardContext<'_> {
    pub fn eval() -> ForwardContext<'static> {
        ForwardContext {
            rng: None,
            adapters_enabled: true,
        }
    }
}

impl Linear {
    /// `x` is `[n, in]`; the result is `[n, out]`.
    fn forward(&self, x: &Tensor, ctx: &mut ForwardContext<'_>) -> Result<Tensor> {
        let mut y = frozen_linear(x, &self.weight)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        if let (Some(lora), true) = (&self.lora, ctx.adapters_enabled) {
            let input = match ctx.rng.as_deref_mut() {
                Some(rng) if lora.dropout > 0.0 => dropout(x, lora.dropout, rng)?,
                _ => x.clone(),
            };
            let delta = input.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
            y = (y + (delta * lora.scale)?)?;
        }
        Ok(y)
    }
}

/// Inverted dropout with a mask drawn from the trainer's generator.
fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.next_f64() < f64::from(p) { 0.0 } else { keep })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
}

pub struct DecoderLayer {
    pub input_layernorm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl DecoderLayer {
    pub fn linear_mut(&mut self, module: &str) -> Option<&mut Linear> {
        match module {
            "q_proj" => Some(&mut self.q_proj),
            "k_proj" => Some(&mut self.k_proj),
            "v_proj" => Some(&mut self.v_proj),
            "o_proj" => Some(&mut self.o_proj),
            "gate_proj" => Some(&mut self.gate_proj),
            "up_proj" => Some(&mut self.up_proj),
            "down_proj" => Some(&mut self.down_proj),
            _ => None,
        }
    }

    pub fn linear(&self, module: &str) -> Option<&Linear> {
        match module {
            "q_proj" => Some(&self.q_proj),
            "k_proj" => Some(&self.k_proj),
            "v_proj" => Some(&self.v_proj),
            "o_proj" => Some(&self.o_proj),
            "gate_proj" => Some(&self.gate_proj),
            "up_proj" => Some(&self.up_proj),
            "down_proj" => Some(&self.down_proj),
            _ => None,
        }
    }
}

/// Inputs shared by every layer of one forward pass.
struct Positions {
    batch: usize,
    seq_len: usize,
    cos: Tensor,
    sin: Tensor,
    /// Additive `[batch, 1, seq, seq]` mask: 0 where a query may attend, -inf elsewhere.
    attention_bias: Tensor,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// The output head; the embedding itself when the model ties them.
    pub lm_head: Tensor,
    device: Device,
}

impl Llama {
    /// Builds the model from f32 weights under Hugging Face names.
    pub fn from_weights(config: &LlamaConfig, weights: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            weights
                .get(name)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("weight {name} is missing")))
        };
        let linear = |prefix: &str| -> Result<Linear> {
            Ok(Linear {
                weight: get(&format!("{prefix}.weight"))?.contiguous()?,
                bias: weights.get(&format!("{prefix}.bias")).cloned(),
                lora: None,
            })
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(DecoderLayer {
                    input_layernorm: get(&format!("{p}.input_layernorm.weight"))?,
                    q_proj: linear(&format!("{p}.self_attn.q_proj"))?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"))?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"))?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj"))?,
                    post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                    gate_proj: linear(&format!("{p}.mlp.gate_proj"))?,
                    up_proj: linear(&format!("{p}.mlp.up_proj"))?,
                    down_proj: linear(&format!("{p}.mlp.down_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = get("model.embed_tokens.weight")?.contiguous()?;
        let lm_head = match weights.get("lm_head.weight") {
            Some(head) if !config.tie_word_embeddings => head.contiguous()?,
            _ => embed_tokens.clone(),
        };
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Final hidden states, `[batch · seq, hidden]`, for right-padded `input_ids` `[batch, seq]`
    /// whose rows hold `lengths[b]` real tokens. Padding is masked by position, so the pad id
    /// may be any token.
    pub fn hidden_states(&self, input_ids: &Tensor, lengths: &[usize], ctx: &mut ForwardContext<'_>) -> Result<Tensor> {
        let (batch, seq_len) = input_ids.dims2()?;
        let positions = self.positions(batch, seq_len, lengths)?;
        let mut hidden = self.embed_tokens.index_select(&input_ids.flatten_all()?, 0)?;
        for layer in &self.layers {
            hidden = self.decoder_layer(layer, &hidden, &positions, ctx)?;
        }
        rms_norm(&hidden, &self.norm, self.config.rms_norm_eps)
    }

    /// Logits `[n, vocab]` for hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        frozen_linear(hidden, &self.lm_head)
    }

    fn decoder_layer(&self, layer: &DecoderLayer, x: &Tensor, positions: &Positions, ctx: &mut ForwardContext<'_>) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let normed = rms_norm(x, &layer.input_layernorm, eps)?;
        let x = (x + self.attention(layer, &normed, positions, ctx)?)?;

        let normed = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
        let gate = layer.gate_proj.forward(&normed, ctx)?.silu()?;
        let up = layer.up_proj.forward(&normed, ctx)?;
        let mlp = layer.down_proj.forward(&(gate * up)?, ctx)?;
        x + mlp
    }

    fn attention(&self, layer: &DecoderLayer, x: &Tensor, positions: &Positions, ctx: &mut ForwardContext<'_>) -> Result<Tensor> {
        let cfg = &self.config;
        let (batch, seq_len) = (positions.batch, positions.seq_len);
        let (n_heads, n_kv_heads, head_dim) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);

        let to_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((batch, seq_len, heads, head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = to_heads(layer.q_proj.forward(x, ctx)?, n_heads)?;
        let k = to_heads(layer.k_proj.forward(x, ctx)?, n_kv_heads)?;
        let v = to_heads(layer.v_proj.forward(x, ctx)?, n_kv_heads)?;

        let q = apply_rotary(&q, &positions.cos, &positions.sin)?;
        let k = apply_rotary(&k, &positions.cos, &positions.sin)?;
        let k = repeat_kv(k, n_heads / n_kv_heads)?;
        let v = repeat_kv(v, n_heads / n_kv_heads)?;

        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let scores = scores.broadcast_add(&positions.attention_bias)?;
        let attended = softmax_last_dim(&scores)?.matmul(&v)?;
        let merged = attended
            .transpose(1, 2)?
            .reshape((batch * seq_len, n_heads * head_dim))?;
        layer.o_proj.forward(&merged, ctx)
    }

    fn positions(&self, batch: usize, seq_len: usize, lengths: &[usize]) -> Result<Positions> {
        let (cos, sin) = rotary_tables(&self.config, seq_len, &self.device)?;
        let mut bias = vec![f32::NEG_INFINITY; batch * seq_len * seq_len];
        for (b, &length) in lengths.iter().enumerate() {
            for query in 0..seq_len {
                // Causal, and never a padded key. A padded query still attends to the real
                // keys before it, so no row is fully masked.
                for key in 0..=query.min(length.max(1) - 1) {
                    bias[(b * seq_len + query) * seq_len + key] = 0.0;
                }
            }
        }
        let dtype = self.embed_tokens.dtype();
        let attention_bias = Tensor::from_vec(bias, (batch, 1, seq_len, seq_len), &self.device)?.to_dtype(dtype)?;
        Ok(Positions {
            batch,
            seq_len,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            attention_bias,
        })
    }

    /// Makes every weight a trained variable for full fine-tuning and returns them under
    /// Hugging Face names. A tied head stays one variable with the embedding, as in PyTorch,
    /// so its gradient is the sum of both uses.
    pub fn make_all_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let tied = self.config.tie_word_embeddings;
        let mut vars = Vec::new();
        let mut promote = |name: String, tensor: &mut Tensor| -> Result<()> {
            let var = Var::from_tensor(tensor)?;
            *tensor = var.as_tensor().clone();
            vars.push((name, var));
            Ok(())
        };
        promote("model.embed_tokens.weight".into(), &mut self.embed_tokens)?;
        for (index, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{index}");
            promote(format!("{prefix}.input_layernorm.weight"), &mut layer.input_layernorm)?;
            promote(format!("{prefix}.post_attention_layernorm.weight"), &mut layer.post_attention_layernorm)?;
            for (parent, module) in crate::config::LINEAR_MODULES {
                let linear = layer.linear_mut(module).expect("module listed in LINEAR_MODULES");
                promote(format!("{prefix}.{parent}.{module}.weight"), &mut linear.weight)?;
                if let Some(bias) = linear.bias.as_mut() {
                    promote(format!("{prefix}.{parent}.{module}.bias"), bias)?;
                }
            }
        }
        promote("model.norm.weight".into(), &mut self.norm)?;
        if tied {
            self.lm_head = self.embed_tokens.clone();
        } else {
            promote("lm_head.weight".into(), &mut self.lm_head)?;
        }
        Ok(vars)
    }

    /// Returns every LoRA variable of the model, in layer order.
    pub fn lora_vars(&self) -> Vec<Var> {
        let mut vars = Vec::new();
        for layer in &self.layers {
            for (_, module) in crate::config::LINEAR_MODULES {
                if let Some(lora) = layer.linear(module).and_then(|linear| linear.lora.as_ref()) {
                    vars.push(lora.a.clone());
                    vars.push(lora.b.clone());
                }
            }
        }
        vars
    }
}

/// `cos` and `sin` tables `[seq, head_dim]` with Hugging Face's layout (frequencies repeated
/// over both halves).
fn rotary_tables(cfg: &LlamaConfig, seq_len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let dim = cfg.head_dim;
    let inv_freq: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    let mut angles = Vec::with_capacity(seq_len * dim);
    for position in 0..seq_len {
        for _ in 0..2 {
            angles.extend(inv_freq.iter().map(|f| position as f32 * f));
        }
    }
    let angles = Tensor::from_vec(angles, (seq_len, dim), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// Repeats each key/value head `n_rep` times, as Hugging Face's `repeat_kv`.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (batch, n_kv_heads, seq_len, head_dim) = x.dims4()?;
    Tensor::cat(&vec![&x; n_rep], 2)?.reshape((batch, n_kv_heads * n_rep, seq_len, head_dim))
}

/// Keys and values of the positions a cached forward has already seen, one `[1, kv_heads,
/// seen, head_dim]` pair per layer, before the heads are repeated for grouped-query attention.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    seen: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.seen
    }

    pub fn is_empty(&self) -> bool {
        self.seen == 0
    }
}

impl Llama {
    /// Runs `new_ids` (one sequence, no padding) after the positions held in `cache`, appends
    /// their keys and values to it and returns the logits of the last new position, `[vocab]`.
    /// It runs without dropout; `adapters_enabled` is as in [`ForwardContext`]. The training
    /// forward ([`Llama::hidden_states`]) is separate and unchanged.
    pub fn forward_cached(&self, new_ids: &[u32], cache: &mut KvCache, adapters_enabled: bool) -> Result<Tensor> {
        let n = new_ids.len();
        if n == 0 {
            return Err(candle_core::Error::Msg("forward_cached needs at least one new token".into()));
        }
        let offset = cache.seen;
        if cache.layers.len() != self.layers.len() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
        }
        let dtype = self.embed_tokens.dtype();
        let (cos, sin) = rotary_tables(&self.config, offset + n, &self.device)?;
        let cos = cos.narrow(0, offset, n)?.to_dtype(dtype)?;
        let sin = sin.narrow(0, offset, n)?.to_dtype(dtype)?;
        // Query i is at position offset + i and attends to keys 0..=offset + i. A single new
        // token attends to every key, so it needs no mask.
        let bias = if n > 1 {
            let total = offset + n;
            let mut bias = vec![f32::NEG_INFINITY; n * total];
            for query in 0..n {
                for key in 0..=offset + query {
                    bias[query * total + key] = 0.0;
                }
            }
            Some(Tensor::from_vec(bias, (1, 1, n, total), &self.device)?.to_dtype(dtype)?)
        } else {
            None
        };

        let ids = Tensor::new(new_ids, &self.device)?;
        let mut hidden = self.embed_tokens.index_select(&ids, 0)?;
        let mut ctx = ForwardContext {
            rng: None,
            adapters_enabled,
        };
        let eps = self.config.rms_norm_eps;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let normed = rms_norm(&hidden, &layer.input_layernorm, eps)?;
            let attended = self.cached_attention(layer, &normed, &cos, &sin, bias.as_ref(), slot, &mut ctx)?;
            let x = (hidden + attended)?;
            let normed = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let gate = layer.gate_proj.forward(&normed, &mut ctx)?.silu()?;
            let up = layer.up_proj.forward(&normed, &mut ctx)?;
            hidden = (x + layer.down_proj.forward(&(gate * up)?, &mut ctx)?)?;
        }
        cache.seen = offset + n;
        let last = hidden.narrow(0, n - 1, 1)?;
        let last = rms_norm(&last, &self.norm, eps)?;
        self.logits(&last)?.squeeze(0)
    }

    #[allow(clippy::too_many_arguments)]
    fn cached_attention(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: Option<&Tensor>,
        slot: &mut Option<(Tensor, Tensor)>,
        ctx: &mut ForwardContext<'_>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let n = x.dim(0)?;
        let (n_heads, n_kv_heads, head_dim) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let to_heads = |t: Tensor, heads: usize| -> Result<Tensor> { t.reshape((1, n, heads, head_dim))?.transpose(1, 2)?.contiguous() };
        let q = to_heads(layer.q_proj.forward(x, ctx)?, n_heads)?;
        let k = to_heads(layer.k_proj.forward(x, ctx)?, n_kv_heads)?;
        let v = to_heads(layer.v_proj.forward(x, ctx)?, n_kv_heads)?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let (k, v) = match slot.take() {
            Some((past_k, past_v)) => (Tensor::cat(&[&past_k, &k], 2)?, Tensor::cat(&[&past_v, &v], 2)?),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        let k = repeat_kv(k, n_heads / n_kv_heads)?;
        let v = repeat_kv(v, n_heads / n_kv_heads)?;

        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let scores = match bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let attended = softmax_last_dim(&scores)?.matmul(&v.contiguous()?)?;
        let merged = attended.transpose(1, 2)?.reshape((n, n_heads * head_dim))?;
        layer.o_proj.forward(&merged, ctx)
    }
}
