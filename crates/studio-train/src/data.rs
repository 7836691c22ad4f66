//! Training and validation examples: rendering, truncation and the automatic hold-out.

use studio_core::dataset::Conversation;

use crate::chat::{ChatEncoder, ChatTemplate, EncodedExample};
use crate::loader::LoadedModel;
use crate::rng::Rng;
use crate::run::{EventLevel, TrainObserver};
use crate::TrainError;

/// Renders and tokenizes every conversation, truncates it to `max_seq_len`, and drops (with a
/// warning event naming `source`) those left without a target token. When none is left, the
/// error names `max_seq_len_param`, the request field or flag that sets the limit.
pub fn encode_examples(
    loaded: &LoadedModel,
    conversations: &[Conversation],
    max_seq_len: usize,
    max_seq_len_param: &str,
    source: &str,
    observer: &mut dyn TrainObserver,
) -> Result<Vec<EncodedExample>, TrainError> {
    let template_source = loaded.chat_template.as_deref().ok_or_else(|| TrainError::InvalidData {
        message: "the base model has no chat template, so conversations cannot be rendered".into(),
        param: Some("model".into()),
    })?;
    let template = ChatTemplate::new(template_source)?;
    let end_of_turn = loaded.tokenizer.id_to_token(loaded.special.eos).unwrap_or_default();
    let encoder = ChatEncoder {
        template: &template,
        tokenizer: &loaded.tokenizer,
        end_of_turn: &end_of_turn,
    };

    let mut examples = Vec::with_capacity(conversations.len());
    let mut dropped = Vec::new();
    for (index, conversation) in conversations.iter().enumerate() {
        let mut example = encoder.encode(conversation)?;
        example.truncate(max_seq_len);
        if example.n_targets() == 0 {
            dropped.push(index + 1);
        } else {
            examples.push(example);
        }
    }
    if !dropped.is_empty() {
        observer.on_event(
            EventLevel::Warn,
            &format!(
                "Dropped {} examples of the {source} with no assistant token within max_seq_len {max_seq_len} (lines {})",
                dropped.len(),
                summarize_lines(&dropped)
            ),
        );
    }
    if examples.is_empty() && !conversations.is_empty() {
        return Err(TrainError::InvalidData {
            message: format!(
                "no example of the {source} has an assistant token within max_seq_len {max_seq_len}; raise max_seq_len or shorten the prompts"
            ),
            param: Some(max_seq_len_param.into()),
        });
    }
    Ok(examples)
}

fn summarize_lines(lines: &[usize]) -> String {
    let listed: Vec<String> = lines.iter().take(10).map(usize::to_string).collect();
    let more = lines.len().saturating_sub(10);
    if more > 0 {
        format!("{} and {more} more", listed.join(", "))
    } else {
        listed.join(", ")
    }
}

/// Training sets at least this large give up a tenth of their examples (at most
/// [`MAX_HOLD_OUT`]) for validation when the job has no validation file.
pub const MIN_EXAMPLES_FOR_HOLD_OUT: usize = 20;
pub const MAX_HOLD_OUT: usize = 64;

/// Splits off a validation set, chosen by a generator of its own so the split does not change
/// the training run's random stream.
pub fn hold_out(examples: Vec<EncodedExample>, seed: u64) -> (Vec<EncodedExample>, Vec<EncodedExample>) {
    if examples.len() < MIN_EXAMPLES_FOR_HOLD_OUT {
        return (examples, Vec::new());
    }
    let count = examples.len().div_ceil(10).min(MAX_HOLD_OUT);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    Rng::new(seed ^ 0x05EE_D0F7_A11D).shuffle(&mut order);
    let held_out: std::collections::HashSet<usize> = order[..count].iter().copied().collect();
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (index, example) in examples.into_iter().enumerate() {
        if held_out.contains(&index) {
            valid.push(example);
        } else {
            train.push(example);
        }
    }
    (train, valid)
}
