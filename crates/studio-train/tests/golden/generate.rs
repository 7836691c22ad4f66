//! Generation on the real model: the KV cache against full re-forwarding, and a greedy reply.

use candle_core::Device;
use studio_core::dataset::{Message, Role};
use studio_train::generate::{generate, generate_uncached, ChatModel, Flow, SamplingParams};

use super::{fixture, loaded, reference_dir, Source};

fn user(content: &str) -> Vec<Message> {
    vec![Message {
        role: Role::User,
        content: content.to_string(),
        weight: None,
    }]
}

fn greedy(max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_new_tokens,
        ..SamplingParams::default()
    }
}

/// Checks that cached and uncached greedy decoding pick the same tokens for two prompts.
fn assert_cache_matches(chat: &ChatModel, label: &str) {
    for prompt in ["Name three colours.", "Write a haiku about the sea."] {
        let ids = chat.encode_prompt(&user(prompt)).unwrap();
        let cached = generate(&chat.model, &ids, &greedy(20), &chat.stop_tokens, &mut |_| Flow::Continue).unwrap();
        let uncached = generate_uncached(&chat.model, &ids, &greedy(20), &chat.stop_tokens).unwrap();
        assert!(!cached.tokens.is_empty(), "{label}: {prompt:?} produced no tokens");
        assert_eq!(cached, uncached, "{label}: {prompt:?}");
    }
}

#[test]
fn generate_cached_equals_uncached_on_base_model() {
    let chat = ChatModel::from_loaded(loaded(Source::Gguf), None, &Device::Cpu).unwrap();
    assert_cache_matches(&chat, "base model");
}

#[test]
fn generate_cached_equals_uncached_with_adapter() {
    let adapter = reference_dir().join("reference_adapter");
    let chat = ChatModel::from_loaded(loaded(Source::Gguf), Some(&adapter), &Device::Cpu).unwrap();
    assert!(!chat.model.lora_vars().is_empty(), "the adapter was not attached");
    assert_cache_matches(&chat, "adapted model");
}

#[test]
fn generate_stop_tokens_come_from_the_model() {
    let gguf = &fixture().gguf;
    let chat = ChatModel::from_loaded(gguf, None, &Device::Cpu).unwrap();
    let im_end = gguf.tokenizer.token_to_id("<|im_end|>").expect("SmolLM2 has <|im_end|>");
    assert_eq!(chat.stop_tokens[0], im_end);
}

#[test]
fn generate_base_model_answers_paris() {
    for source in [Source::Gguf, Source::HuggingFace] {
        let chat = ChatModel::from_loaded(loaded(source), None, &Device::Cpu).unwrap();
        let reply = chat
            .reply(&user("What is the capital of France?"), &greedy(30), &[], &mut |_| {})
            .unwrap();
        assert!(reply.text.contains("Paris"), "{source:?}: {:?}", reply.text);
        assert!(!reply.text.contains("<|im_end|>"), "{source:?}: {:?}", reply.text);
    }
}
