//! Text generation with a key/value cache: greedy decoding or seeded sampling with temperature,
//! top-k and top-p, stopping at the chat template's end-of-turn token.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use studio_core::dataset::Message;
use tokenizers::Tokenizer;

use crate::chat::ChatTemplate;
use crate::loader::{load_model, LoadedModel};
use crate::model::{ForwardContext, KvCache, Llama};
use crate::rng::Rng;
use crate::TrainError;

/// Settings of token selection.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keeps the smallest set of tokens whose probabilities add up to at least this; 1 keeps all.
    pub top_p: f64,
    /// Keeps the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Seeds the sampler, so equal seeds draw equal tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects values outside their ranges with a message naming the field.
    pub fn validate(&self) -> Result<(), TrainError> {
        let invalid = |message: String, param: &str| TrainError::InvalidData {
            message,
            param: Some(param.to_string()),
        };
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(invalid(
                format!(
                    "temperature {} is out of range: use a value from 0 to 2",
                    self.temperature
                ),
                "temperature",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid(
                format!(
                    "top_p {} is out of range: use a value above 0 and at most 1",
                    self.top_p
                ),
                "top_p",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (or a stop sequence) ended the reply.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
}

impl FinishReason {
    /// Returns the name that OpenAI's `finish_reason` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The tokens a generation produced, without the stop token that ended it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
}

/// Whether generation goes on after a token was reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Generates after `prompt` with a KV cache: the prompt runs once, then one token per step.
/// `on_token` receives each new token (never a stop token) and may end generation, which then
/// finishes with [`FinishReason::Stop`].
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    stop_tokens: &[u32],
    on_token: &mut dyn FnMut(u32) -> Flow,
) -> Result<Generation, TrainError> {
    let mut cache = KvCache::new();
    decode(prompt, params, stop_tokens, on_token, |context, new| {
        Ok(model.forward_cached(&context[context.len() - new..], &mut cache, true)?)
    })
}

/// Generates as [`generate`] does, but runs the whole sequence through the training forward at
/// every step. It is slow and exists to check the cached path.
pub fn generate_uncached(
    model: &Llama,
    prompt: &[u32],
    params: &SamplingParams,
    stop_tokens: &[u32],
) -> Result<Generation, TrainError> {
    decode(
        prompt,
        params,
        stop_tokens,
        &mut |_| Flow::Continue,
        |context, _| {
            let ids = Tensor::new(context, model.device())?.unsqueeze(0)?;
            let hidden =
                model.hidden_states(&ids, &[context.len()], &mut ForwardContext::eval())?;
            let last = hidden.narrow(0, context.len() - 1, 1)?;
            Ok(model.logits(&last)?.squeeze(0)?)
        },
    )
}

/// The decoding loop; `next_logits(context, new)` returns the logits after `context`, whose
/// last `new` tokens have not been seen before.
fn decode(
    prompt: &[u32],
    params: &SamplingParams,
    stop_tokens: &[u32],
    on_token: &mut dyn FnMut(u32) -> Flow,
    mut next_logits: impl FnMut(&[u32], usize) -> Result<Tensor, TrainError>,
) -> Result<Generation, TrainError> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(TrainError::InvalidData {
            message: "the prompt has no tokens: generation needs at least one".into(),
            param: Some("messages".into()),
        });
    }
    let mut rng = Rng::new(params.seed);
    let mut context = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut new = prompt.len();
    while tokens.len() < params.max_new_tokens {
        let logits = next_logits(&context, new)?;
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        let token = sample(&logits, params, &mut rng);
        if stop_tokens.contains(&token) {
            return Ok(Generation {
                tokens,
                finish_reason: FinishReason::Stop,
            });
        }
        tokens.push(token);
        context.push(token);
        new = 1;
        if on_token(token) == Flow::Stop {
            return Ok(Generation {
                tokens,
                finish_reason: FinishReason::Stop,
            });
        }
    }
    Ok(Generation {
        tokens,
        finish_reason: FinishReason::Length,
    })
}

/// Picks the next token from `logits`. Ties in greedy decoding go to the lowest id.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.temperature == 0.0 || params.top_k == 1 {
        return argmax(logits);
    }
    let mut candidates: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, logit)| logit.is_finite())
        .map(|(id, &logit)| (id as u32, f64::from(logit) / params.temperature))
        .collect();
    if candidates.is_empty() {
        return argmax(logits);
    }
    // Most likely first; equal logits keep id order, so the draw does not depend on sort details.
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        candidates.truncate(params.top_k);
    }
    let max = candidates[0].1;
    let mut probs: Vec<f64> = candidates
        .iter()
        .map(|(_, logit)| (logit - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= params.top_p
            })
            .map_or(probs.len(), |index| index + 1);
        probs.truncate(keep);
        candidates.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut draw = rng.next_f64() * total;
    for (index, p) in probs.iter().enumerate() {
        draw -= p;
        if draw < 0.0 {
            return candidates[index].0;
        }
    }
    candidates[candidates.len() - 1].0
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = index;
        }
    }
    best as u32
}

/// A model ready to chat: weights (with an adapter applied, if any), tokenizer, chat template
/// and the tokens that end a reply.
pub struct ChatModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The chat template's end-of-turn token, and the tokenizer's end-of-text token when it has
    /// a different one.
    pub stop_tokens: Vec<u32>,
    bos: Option<u32>,
}

/// One reply to a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatReply {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl ChatModel {
    /// Loads a base model (GGUF file or Hugging Face folder, which includes a fully fine-tuned
    /// model) and applies the PEFT adapter in `adapter`, if given.
    pub fn load(path: &Path, adapter: Option<&Path>, device: &Device) -> Result<Self, TrainError> {
        let loaded = load_model(path, device)?;
        Self::from_loaded(&loaded, adapter, device)
    }

    /// Builds the model from weights already in memory; they are shared, not copied.
    pub fn from_loaded(
        loaded: &LoadedModel,
        adapter: Option<&Path>,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut model = Llama::from_weights(&loaded.config, &loaded.weights, device)?;
        if let Some(dir) = adapter {
            crate::lora::apply_adapter(&mut model, dir)?;
        }
        let source = loaded.chat_template.as_deref().ok_or_else(|| TrainError::InvalidData {
            message: "the model has no chat template, so conversations cannot be rendered: use a chat (instruct) model".into(),
            param: Some("model".into()),
        })?;
        let template = ChatTemplate::new(source)?;
        let mut stop_tokens = vec![loaded.special.eos];
        if let Some(end_of_text) = loaded.tokenizer.token_to_id("<|endoftext|>") {
            if end_of_text != loaded.special.eos {
                stop_tokens.push(end_of_text);
            }
        }
        Ok(Self {
            model,
            tokenizer: loaded.tokenizer.clone(),
            template,
            stop_tokens,
            bos: loaded.special.bos,
        })
    }

    /// Returns the prompt's token ids: the conversation rendered with the generation prompt.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, TrainError> {
        let text = self.template.render(messages, true)?;
        let encoding =
            self.tokenizer
                .encode(text.as_str(), false)
                .map_err(|err| TrainError::InvalidData {
                    message: format!("tokenization failed: {err}"),
                    param: Some("messages".into()),
                })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.is_empty() {
            if let Some(bos) = self.bos {
                ids.push(bos);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, tokens: &[u32]) -> Result<String, TrainError> {
        self.tokenizer
            .decode(tokens, true)
            .map_err(|err| TrainError::InvalidData {
                message: format!("detokenization failed: {err}"),
                param: None,
            })
    }

    /// Generates the assistant's reply to `messages`. `on_text` receives the reply's text in
    /// order as it is produced, and the pieces add up to [`ChatReply::text`]. Generation also
    /// stops before the first of `stop` (text sequences), which is not part of the reply.
    pub fn reply(
        &self,
        messages: &[Message],
        params: &SamplingParams,
        stop: &[String],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ChatReply, TrainError> {
        self.reply_until(messages, params, stop, &mut |piece| {
            on_text(piece);
            Flow::Continue
        })
    }

    /// Generates like [`ChatModel::reply`], and ends generation early when `on_text` returns
    /// [`Flow::Stop`] (a streaming client that went away), finishing with [`FinishReason::Stop`].
    pub fn reply_until(
        &self,
        messages: &[Message],
        params: &SamplingParams,
        stop: &[String],
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<ChatReply, TrainError> {
        let prompt = self.encode_prompt(messages)?;
        let stop: Vec<&str> = stop
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        let mut streamer = TextStreamer::new(&stop);
        let mut tokens = Vec::new();
        let mut failure = None;
        let mut cancelled = false;
        let generation = generate(
            &self.model,
            &prompt,
            params,
            &self.stop_tokens,
            &mut |token| {
                tokens.push(token);
                match self.decode(&tokens) {
                    Ok(text) => {
                        let stopped = streamer.push(&text, &mut |piece| {
                            if on_text(piece) == Flow::Stop {
                                cancelled = true;
                            }
                        });
                        if stopped || cancelled {
                            Flow::Stop
                        } else {
                            Flow::Continue
                        }
                    }
                    Err(err) => {
                        failure = Some(err);
                        Flow::Stop
                    }
                }
            },
        )?;
        if let Some(err) = failure {
            return Err(err);
        }
        let finish_reason = if streamer.stopped {
            FinishReason::Stop
        } else {
            generation.finish_reason
        };
        let text = streamer.finish(&mut |piece| {
            on_text(piece);
        });
        Ok(ChatReply {
            text,
            finish_reason,
            prompt_tokens: prompt.len(),
            completion_tokens: generation.tokens.len(),
        })
    }
}

/// Turns the growing decoded text into pieces that are safe to show: it holds back a trailing
/// partial character and any tail that could begin a stop sequence.
struct TextStreamer<'a> {
    stop: &'a [&'a str],
    /// The reply so far, cut at a stop sequence once one appears.
    text: String,
    emitted: usize,
    stopped: bool,
}

impl<'a> TextStreamer<'a> {
    fn new(stop: &'a [&'a str]) -> Self {
        Self {
            stop,
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Takes the full decoded text so far; returns true when a stop sequence appeared.
    fn push(&mut self, decoded: &str, on_text: &mut dyn FnMut(&str)) -> bool {
        self.text = decoded.to_string();
        if let Some(position) = self.stop.iter().filter_map(|s| self.text.find(s)).min() {
            self.text.truncate(position);
            self.stopped = true;
            self.flush(self.text.len(), on_text);
            return true;
        }
        // A byte sequence split across tokens decodes to U+FFFD until it is complete.
        let mut safe = self.text.trim_end_matches('\u{FFFD}').len();
        for stop in self.stop {
            for length in (1..stop.len()).rev() {
                if stop.is_char_boundary(length) && self.text[..safe].ends_with(&stop[..length]) {
                    safe = safe.min(self.text.len() - length);
                    break;
                }
            }
        }
        self.flush(safe, on_text);
        false
    }

    fn flush(&mut self, upto: usize, on_text: &mut dyn FnMut(&str)) {
        if upto > self.emitted
            && self.text.is_char_boundary(upto)
            && self.text.is_char_boundary(self.emitted)
        {
            on_text(&self.text[self.emitted..upto]);
            self.emitted = upto;
        }
    }

    fn finish(mut self, on_text: &mut dyn FnMut(&str)) -> String {
        self.flush(self.text.len(), on_text);
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{tiny_config, tiny_weights};

    fn tiny(model_type: &str) -> Llama {
        let config = tiny_config(model_type);
        let weights = tiny_weights(&config, 7, DType::F32).unwrap();
        Llama::from_weights(&config, &weights, &Device::Cpu).unwrap()
    }

    fn greedy(max_new_tokens: usize) -> SamplingParams {
        SamplingParams {
            max_new_tokens,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn generate_cached_equals_uncached_on_tiny_models() {
        for model_type in ["llama", "mistral", "qwen2"] {
            let model = tiny(model_type);
            for prompt in [vec![1u32, 5, 9, 2], vec![30u32]] {
                let cached =
                    generate(&model, &prompt, &greedy(20), &[], &mut |_| Flow::Continue).unwrap();
                let uncached = generate_uncached(&model, &prompt, &greedy(20), &[]).unwrap();
                assert_eq!(cached, uncached, "{model_type} prompt {prompt:?}");
                assert_eq!(cached.tokens.len(), 20);
                assert_eq!(cached.finish_reason, FinishReason::Length);
            }
        }
    }

    #[test]
    fn generate_cached_logits_match_full_forward() {
        let model = tiny("mistral");
        let ids = [3u32, 8, 13, 21, 34, 40];
        let full = model
            .hidden_states(
                &Tensor::new(&ids[..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                &[ids.len()],
                &mut ForwardContext::eval(),
            )
            .unwrap();
        let full: Vec<Vec<f32>> = model.logits(&full).unwrap().to_vec2().unwrap();
        // Prompt of 3, then one token at a time, then 2 at once.
        let mut cache = KvCache::new();
        let check = |logits: Tensor, position: usize| {
            let logits: Vec<f32> = logits.to_vec1().unwrap();
            for (a, b) in logits.iter().zip(&full[position]) {
                assert!((a - b).abs() < 1e-4, "position {position}: {a} vs {b}");
            }
        };
        check(
            model.forward_cached(&ids[..3], &mut cache, true).unwrap(),
            2,
        );
        check(
            model.forward_cached(&ids[3..4], &mut cache, true).unwrap(),
            3,
        );
        check(
            model.forward_cached(&ids[4..6], &mut cache, true).unwrap(),
            5,
        );
        assert_eq!(cache.len(), 6);
    }

    #[test]
    fn generate_sampling_is_reproducible_with_a_seed() {
        let model = tiny("llama");
        let params = SamplingParams {
            max_new_tokens: 30,
            temperature: 1.0,
            top_p: 0.95,
            top_k: 20,
            seed: 11,
        };
        let run = |params: &SamplingParams| {
            generate(&model, &[1, 2, 3], params, &[], &mut |_| Flow::Continue)
                .unwrap()
                .tokens
        };
        let first = run(&params);
        assert_eq!(first, run(&params));
        let other_seed = run(&SamplingParams {
            seed: 12,
            ..params.clone()
        });
        assert_ne!(
            first, other_seed,
            "a different seed should draw a different sequence"
        );
        let greedy_tokens = run(&greedy(30));
        assert_ne!(
            first, greedy_tokens,
            "sampling at temperature 1 should leave the greedy path"
        );
    }

    #[test]
    fn generate_top_k_one_equals_greedy() {
        let model = tiny("qwen2");
        let top_one = SamplingParams {
            max_new_tokens: 15,
            temperature: 1.5,
            top_p: 1.0,
            top_k: 1,
            seed: 3,
        };
        let sampled = generate(&model, &[4, 4, 7], &top_one, &[], &mut |_| Flow::Continue).unwrap();
        let greedy_run = generate(&model, &[4, 4, 7], &greedy(15), &[], &mut |_| {
            Flow::Continue
        })
        .unwrap();
        assert_eq!(sampled, greedy_run);
    }

    #[test]
    fn generate_sample_respects_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 2.9, -1.0, 2.8];
        let mut rng = Rng::new(5);
        let top_two = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            ..SamplingParams::default()
        };
        for _ in 0..200 {
            assert!(matches!(sample(&logits, &top_two, &mut rng), 1 | 2));
        }
        // The most likely token alone has well under half the mass; a tiny top_p keeps just it.
        let nucleus = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            ..SamplingParams::default()
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &nucleus, &mut rng), 1);
        }
        let mut seen = [false; 5];
        let all = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        };
        for _ in 0..2000 {
            seen[sample(&logits, &all, &mut rng) as usize] = true;
        }
        assert_eq!(seen, [true; 5]);
    }

    #[test]
    fn generate_stops_at_a_stop_token() {
        let model = tiny("llama");
        let free = generate(&model, &[1, 2, 3], &greedy(12), &[], &mut |_| {
            Flow::Continue
        })
        .unwrap();
        let stop_at = free.tokens[4];
        let first = free.tokens.iter().position(|&t| t == stop_at).unwrap();
        let stopped = generate(&model, &[1, 2, 3], &greedy(12), &[stop_at], &mut |_| {
            Flow::Continue
        })
        .unwrap();
        assert_eq!(stopped.tokens, free.tokens[..first]);
        assert_eq!(stopped.finish_reason, FinishReason::Stop);

        let mut seen = 0;
        let ended = generate(&model, &[1, 2, 3], &greedy(12), &[], &mut |_| {
            seen += 1;
            if seen == 3 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
        assert_eq!(ended.tokens, free.tokens[..3]);
        assert_eq!(ended.finish_reason, FinishReason::Stop);
    }

    #[test]
    fn generate_rejects_bad_parameters_and_empty_prompts() {
        let model = tiny("llama");
        let hot = SamplingParams {
            temperature: 3.0,
            ..SamplingParams::default()
        };
        let err = generate(&model, &[1], &hot, &[], &mut |_| Flow::Continue).unwrap_err();
        assert!(err.to_string().contains("temperature 3"), "{err}");
        let err = generate(&model, &[], &greedy(3), &[], &mut |_| Flow::Continue).unwrap_err();
        assert!(err.to_string().contains("no tokens"), "{err}");
    }

    #[test]
    fn generate_text_streamer_holds_back_stop_prefixes() {
        let stop = ["END"];
        let mut streamer = TextStreamer::new(&stop);
        let mut pieces = Vec::new();
        let mut on_text = |piece: &str| pieces.push(piece.to_string());
        assert!(!streamer.push("Hello E", &mut on_text));
        assert!(!streamer.push("Hello EN", &mut on_text));
        assert!(streamer.push("Hello ENDING", &mut on_text));
        let text = streamer.finish(&mut on_text);
        assert_eq!(text, "Hello ");
        assert_eq!(pieces.concat(), "Hello ");
        assert!(pieces.iter().all(|piece| !piece.contains('E')));
    }

    #[test]
    fn generate_chat_reply_ends_at_stop_sequence() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "mistral", 8).unwrap();
        let chat = ChatModel::load(dir.path(), None, &Device::Cpu).unwrap();
        let messages = vec![Message {
            role: studio_core::dataset::Role::User,
            content: "tell me more".into(),
            weight: None,
        }];
        let free = chat
            .reply(&messages, &greedy(16), &[], &mut |_| {})
            .unwrap();
        let chars: Vec<char> = free.text.chars().collect();
        assert!(
            chars.len() >= 4,
            "the tiny model replied too little to test: {:?}",
            free.text
        );
        let stop: String = chars[2..4].iter().collect();
        let before = &free.text[..free.text.find(&stop).unwrap()];

        let mut streamed = String::new();
        let stopped = chat
            .reply(&messages, &greedy(16), std::slice::from_ref(&stop), &mut |piece| {
                streamed.push_str(piece)
            })
            .unwrap();

        assert_eq!(stopped.text, before, "stop {stop:?} in {:?}", free.text);
        assert_eq!(streamed, before);
        assert_eq!(stopped.finish_reason, FinishReason::Stop);
    }

    #[test]
    fn generate_chat_reply_on_a_tiny_folder() {
        let dir = tempfile::tempdir().unwrap();
        crate::tiny::write_tiny_model_folder(dir.path(), "llama", 3).unwrap();
        let chat = ChatModel::load(dir.path(), None, &Device::Cpu).unwrap();
        let im_end = chat.tokenizer.token_to_id("<|im_end|>").unwrap();
        assert!(chat.stop_tokens.contains(&im_end));
        let messages = vec![Message {
            role: studio_core::dataset::Role::User,
            content: "hi".into(),
            weight: None,
        }];
        let mut streamed = String::new();
        let reply = chat
            .reply(&messages, &greedy(8), &[], &mut |piece| {
                streamed.push_str(piece)
            })
            .unwrap();
        assert_eq!(reply.text, streamed);
        assert!(reply.completion_tokens <= 8);
        assert!(reply.prompt_tokens > 10);
    }
}
