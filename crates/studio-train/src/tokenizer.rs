//! A byte-level BPE tokenizer rebuilt from a vocabulary and merge list.
//!
//! GGUF files carry the vocabulary, not a `tokenizer.json`. candle 0.11's `TokenizerFromGguf`
//! adds a space in front of the text, which SmolLM's tokenizer (`tokenizer.ggml.pre = "smollm"`,
//! `add_space_prefix = false`) does not do, so the `tokenizers` pipeline is assembled here the
//! way the model's own `tokenizer.json` describes it.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Builds a GPT-2 style byte-level BPE tokenizer. `special` lists the tokens that are matched
/// whole in the input before BPE runs (`<|im_start|>` and the like).
pub fn byte_level_bpe(
    tokens: &[String],
    merges: &[String],
    special: &[String],
    add_prefix_space: bool,
) -> Result<Tokenizer, String> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(left, right)| (left.to_string(), right.to_string()))
                .ok_or_else(|| format!("invalid BPE merge {merge:?}: expected two tokens separated by a space"))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|err| format!("invalid BPE vocabulary: {err}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(add_prefix_space, true, true)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = special
        .iter()
        .map(|content| AddedToken::from(content.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}
