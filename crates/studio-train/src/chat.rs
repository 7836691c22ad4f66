//! Conversations to token ids with a target mask, through the model's own chat template.

use std::ops::Range;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use studio_core::dataset::{Conversation, Message, Role};
use tokenizers::Tokenizer;

use crate::TrainError;

/// A Jinja chat template, rendered as `transformers` renders it (`trim_blocks` and
/// `lstrip_blocks` on, `raise_exception` available).
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, TrainError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |message: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|err| invalid_template(&err))?;
        Ok(Self { env })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TrainError> {
        let messages: Vec<_> = messages
            .iter()
            .map(|message| context! { role => message.role.as_str(), content => &message.content })
            .collect();
        let template = self.env.get_template("chat").map_err(|err| invalid_template(&err))?;
        template
            .render(context! { messages => messages, add_generation_prompt => add_generation_prompt })
            .map_err(|err| invalid_template(&err))
    }
}

fn invalid_template(err: &JinjaError) -> TrainError {
    TrainError::InvalidData {
        message: format!("the model's chat template failed: {err:#}"),
        param: None,
    }
}

/// A tokenized example. `targets[i]` is true when token `i` is one the model must learn to
/// produce: the content of a trained assistant turn and the end-of-turn token after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedExample {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
}

impl EncodedExample {
    /// Number of positions that contribute to the loss (targets after the first token).
    pub fn n_targets(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&target| target).count()
    }

    /// Keeps the first `max_len` tokens.
    pub fn truncate(&mut self, max_len: usize) {
        self.ids.truncate(max_len);
        self.targets.truncate(max_len);
    }
}

/// Renders conversations with a chat template and marks the assistant tokens.
pub struct ChatEncoder<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    /// The end-of-turn token's text, `<|im_end|>` for SmolLM2.
    pub end_of_turn: &'a str,
}

impl ChatEncoder<'_> {
    /// Renders the whole conversation once and tokenizes it once without added special tokens;
    /// assistant spans are found by rendering each prefix of the conversation.
    pub fn encode(&self, conversation: &Conversation) -> Result<EncodedExample, TrainError> {
        let messages = &conversation.messages;
        let text = self.template.render(messages, false)?;
        let spans = self.target_spans(messages, &text)?;

        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|err| TrainError::InvalidData {
                message: format!("tokenization failed: {err}"),
                param: None,
            })?;
        let targets = encoding
            .get_offsets()
            .iter()
            .map(|&(start, end)| {
                spans
                    .iter()
                    .any(|span| start >= span.start && start < span.end && end <= span.end)
            })
            .collect();
        Ok(EncodedExample {
            ids: encoding.get_ids().to_vec(),
            targets,
        })
    }

    /// Byte ranges of `text` holding each trained assistant reply and its end-of-turn token.
    fn target_spans(&self, messages: &[Message], text: &str) -> Result<Vec<Range<usize>>, TrainError> {
        let mut spans = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            if message.role != Role::Assistant || message.weight == Some(0.0) {
                continue;
            }
            let prompt = self.template.render(&messages[..index], true)?;
            let through_reply = self.template.render(&messages[..=index], false)?;
            if !through_reply.starts_with(&prompt) || !text.starts_with(&through_reply) {
                // NOTE: templates that rewrite earlier turns (some drop past reasoning) break
                // this prefix rule and are rejected rather than trained with a wrong mask.
                return Err(TrainError::InvalidData {
                    message: format!(
                        "the model's chat template does not render turn {} as an extension of the turns before it, so the assistant tokens cannot be located",
                        index + 1
                    ),
                    param: Some("model".to_string()),
                });
            }
            let end = match through_reply.rfind(self.end_of_turn) {
                Some(position) if position >= prompt.len() => position + self.end_of_turn.len(),
                _ => through_reply.len(),
            };
            spans.push(prompt.len()..end);
        }
        Ok(spans)
    }
}
