//! Dataset lines as the trainer consumes them.

use serde::{Deserialize, Serialize};

/// The author of one chat turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Returns the role's name as chat templates and OpenAI's format spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat turn. `weight: 0` on an assistant turn keeps it in the context but out of the loss,
/// as in OpenAI's chat fine-tuning format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
}

/// One supervised training example: a conversation whose assistant turns are the targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

/// The supervised line formats a dataset file may use. All lines of one file share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// OpenAI's chat format: `{"messages": [{"role", "content", "weight"?}, …]}`.
    Chat,
    /// `{"prompt", "completion"}`: one user turn and one assistant turn.
    PromptCompletion,
    /// Alpaca: `{"instruction", "input"?, "output"}`.
    Alpaca,
    /// Preference pairs for DPO: OpenAI's `{"input": {"messages"}, "preferred_output",
    /// "non_preferred_output"}` or `{"prompt", "chosen", "rejected"}` (see [`PreferencePair`]).
    Preference,
    /// Prompts alone, for distillation, whose teacher writes the replies: `{"messages"}` ending
    /// with a user turn, or `{"prompt"}` without a completion.
    Prompts,
}

impl DatasetFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetFormat::Chat => "chat",
            DatasetFormat::PromptCompletion => "prompt_completion",
            DatasetFormat::Alpaca => "alpaca",
            DatasetFormat::Preference => "preference",
            DatasetFormat::Prompts => "prompts",
        }
    }

    /// Parses a name written by [`DatasetFormat::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        [
            DatasetFormat::Chat,
            DatasetFormat::PromptCompletion,
            DatasetFormat::Alpaca,
            DatasetFormat::Preference,
            DatasetFormat::Prompts,
        ]
        .into_iter()
        .find(|format| format.as_str() == name)
    }
}

/// A rejected dataset line. `line` is 1-based, as editors count.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct LineError {
    pub line: usize,
    pub problem: LineProblem,
}

/// The problem with one line. Fields are named by their JSON path, as `messages[2].role`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LineProblem {
    #[error("not valid JSON ({0})")]
    NotJson(String),
    #[error("expected a JSON object, got {0}")]
    NotObject(&'static str),
    #[error(
        "unknown format with keys [{0}]; expected {{\"messages\": [...]}}, \
         {{\"prompt\", \"completion\"}} or {{\"instruction\", \"input\", \"output\"}}"
    )]
    UnknownFormat(String),
    #[error("this line is in the {found} format but the file started in the {expected} format; use one format per file")]
    MixedFormats {
        expected: &'static str,
        found: &'static str,
    },
    #[error("missing required field '{0}'")]
    MissingField(String),
    #[error("field '{0}' is null; expected a value")]
    NullField(String),
    #[error("field '{field}' must be {expected}, got {found}")]
    WrongType {
        field: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("field '{field}' has unknown role {role:?}; expected system, user or assistant")]
    UnknownRole { field: String, role: String },
    #[error("field '{0}' is an empty assistant response")]
    EmptyAssistantContent(String),
    #[error("field '{0}' must be 0 or 1")]
    InvalidWeight(String),
    #[error("field '{0}' is an empty list")]
    EmptyMessages(String),
    #[error("no assistant turn to learn from")]
    NoAssistantTurn,
    #[error("every assistant turn has weight 0, so the line trains nothing")]
    AllWeightsZero,
    #[error("the last turn is from the {0}; it must be from the assistant")]
    LastTurnNotAssistant(&'static str),
    #[error("field '{0}' is an empty response")]
    EmptyResponse(String),
    #[error("fields '{0}' and '{1}' are the same text, so the pair prefers nothing")]
    IdenticalResponses(String, String),
    #[error("field '{0}' is an empty prompt")]
    EmptyPrompt(String),
    #[error("field '{field}' is {role:?}; a reply must be from the assistant")]
    ReplyNotAssistant { field: String, role: String },
    #[error("the last turn of '{0}' is from the {1}; a prompt must end with a user turn")]
    PromptNotEndingWithUser(String, &'static str),
}

/// One valid line converted to a conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedLine {
    pub format: DatasetFormat,
    pub conversation: Conversation,
    /// Keys the format does not use; they are ignored, never an error.
    pub unknown_keys: usize,
}

/// Parses one line of a supervised dataset. `line` is its 1-based number, used in errors.
pub fn parse_line(line: usize, text: &str) -> Result<ParsedLine, LineError> {
    let at = |problem| LineError { line, problem };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|err| at(LineProblem::NotJson(err.to_string())))?;
    let serde_json::Value::Object(object) = value else {
        return Err(at(LineProblem::NotObject(type_name(&value))));
    };
    let format = detect_format(&object).map_err(at)?;
    let (conversation, unknown_keys) = match format {
        DatasetFormat::Chat => parse_chat(&object),
        DatasetFormat::PromptCompletion => parse_prompt_completion(&object),
        DatasetFormat::Alpaca => parse_alpaca(&object),
        DatasetFormat::Preference => parse_preference(&object).map(|(pair, unknown)| (pair.as_chosen_conversation(), unknown)),
        DatasetFormat::Prompts => parse_prompts(&object),
    }
    .map_err(at)?;
    Ok(ParsedLine {
        format,
        conversation,
        unknown_keys,
    })
}

/// Validates a dataset file one line at a time, so a caller can check an upload while it
/// streams. Blank lines are skipped but still counted for line numbers.
#[derive(Debug, Default)]
pub struct DatasetValidator {
    next_line: usize,
    format: Option<DatasetFormat>,
    examples: usize,
    unknown_keys: usize,
}

/// The contents of a valid dataset file, in figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatasetSummary {
    pub format: DatasetFormat,
    /// Number of examples (non-blank lines).
    pub line_count: usize,
    /// Keys ignored across all lines.
    pub unknown_keys: usize,
}

/// A dataset file with no examples.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the file has no examples; write one JSON object per line")]
pub struct EmptyDataset;

impl DatasetValidator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next line (without its line terminator) and returns its conversation, or
    /// `None` for a blank line.
    pub fn push_line(&mut self, text: &str) -> Result<Option<Conversation>, LineError> {
        self.next_line += 1;
        let text = text.strip_suffix('\r').unwrap_or(text);
        // Editors such as Notepad start UTF-8 files with a byte order mark; it is not content.
        let text = match self.next_line {
            1 => text.strip_prefix('\u{feff}').unwrap_or(text),
            _ => text,
        };
        if text.trim().is_empty() {
            return Ok(None);
        }
        let parsed = parse_line(self.next_line, text)?;
        match self.format {
            None => self.format = Some(parsed.format),
            Some(expected) if expected != parsed.format => {
                return Err(LineError {
                    line: self.next_line,
                    problem: LineProblem::MixedFormats {
                        expected: expected.as_str(),
                        found: parsed.format.as_str(),
                    },
                })
            }
            Some(_) => {}
        }
        self.examples += 1;
        self.unknown_keys += parsed.unknown_keys;
        Ok(Some(parsed.conversation))
    }

    pub fn finish(self) -> Result<DatasetSummary, EmptyDataset> {
        let format = self.format.ok_or(EmptyDataset)?;
        Ok(DatasetSummary {
            format,
            line_count: self.examples,
            unknown_keys: self.unknown_keys,
        })
    }
}

/// An invalid dataset file: a bad line or no examples at all.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Line(#[from] LineError),
    #[error(transparent)]
    Empty(#[from] EmptyDataset),
    #[error("the file is not valid UTF-8 at line {0}")]
    NotUtf8(usize),
}

/// Parses a whole supervised dataset held in memory into its conversations.
pub fn parse_dataset(bytes: &[u8]) -> Result<(Vec<Conversation>, DatasetSummary), DatasetError> {
    let mut validator = DatasetValidator::new();
    let mut conversations = Vec::new();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let text = std::str::from_utf8(line).map_err(|_| DatasetError::NotUtf8(index + 1))?;
        if let Some(conversation) = validator.push_line(text)? {
            conversations.push(conversation);
        }
    }
    let summary = validator.finish()?;
    Ok((conversations, summary))
}

type Object = serde_json::Map<String, serde_json::Value>;

fn detect_format(object: &Object) -> Result<DatasetFormat, LineProblem> {
    let has = |key| object.contains_key(key);
    if PREFERENCE_KEYS.iter().any(|key| has(*key)) {
        Ok(DatasetFormat::Preference)
    } else if has("messages") && ends_with_user_turn(object) {
        Ok(DatasetFormat::Prompts)
    } else if has("messages") {
        Ok(DatasetFormat::Chat)
    } else if has("prompt") && !has("completion") {
        Ok(DatasetFormat::Prompts)
    } else if has("prompt") || has("completion") {
        Ok(DatasetFormat::PromptCompletion)
    } else if has("instruction") || has("output") {
        Ok(DatasetFormat::Alpaca)
    } else {
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        Err(LineProblem::UnknownFormat(keys.join(", ")))
    }
}

fn count_unknown(object: &Object, known: &[&str]) -> usize {
    object
        .keys()
        .filter(|key| !known.contains(&key.as_str()))
        .count()
}

/// Tells whether `messages` is a list whose last entry is a user turn.
fn ends_with_user_turn(object: &Object) -> bool {
    let last = object.get("messages").and_then(|m| m.as_array()).and_then(|items| items.last());
    last.and_then(|turn| turn.get("role")).and_then(|role| role.as_str()) == Some("user")
}

fn parse_chat(object: &Object) -> Result<(Conversation, usize), LineProblem> {
    let (messages, unknown_keys) = parse_message_list(object)?;
    check_turns(&messages)?;
    Ok((Conversation { messages }, unknown_keys))
}

/// Parses a prompt for a teacher to answer: a message list ending with a user turn (checked by
/// [`detect_format`]), or a `prompt` string as one user turn.
fn parse_prompts(object: &Object) -> Result<(Conversation, usize), LineProblem> {
    if object.contains_key("messages") {
        let (messages, unknown_keys) = parse_message_list(object)?;
        return Ok((Conversation { messages }, unknown_keys));
    }
    let prompt = string(object, "prompt", "prompt")?;
    if prompt.trim().is_empty() {
        return Err(LineProblem::EmptyPrompt("prompt".into()));
    }
    Ok((Conversation { messages: vec![turn(Role::User, prompt)] }, count_unknown(object, &["prompt"])))
}

fn parse_message_list(object: &Object) -> Result<(Vec<Message>, usize), LineProblem> {
    let items = match field(object, "messages", "messages")? {
        serde_json::Value::Array(items) => items,
        other => return Err(wrong_type("messages", "a list of messages", other)),
    };
    if items.is_empty() {
        return Err(LineProblem::EmptyMessages("messages".into()));
    }
    let mut unknown_keys = count_unknown(object, &["messages"]);
    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let path = format!("messages[{index}]");
        let serde_json::Value::Object(turn) = item else {
            return Err(wrong_type(&path, "an object", item));
        };
        unknown_keys += count_unknown(turn, &["role", "content", "weight"]);
        messages.push(parse_message(turn, &path)?);
    }
    Ok((messages, unknown_keys))
}

fn parse_message(turn: &Object, path: &str) -> Result<Message, LineProblem> {
    let role_path = format!("{path}.role");
    let role = match string(turn, "role", &role_path)?.as_str() {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        other => {
            return Err(LineProblem::UnknownRole {
                field: role_path,
                role: other.to_owned(),
            })
        }
    };
    let content_path = format!("{path}.content");
    let content = string(turn, "content", &content_path)?;
    if role == Role::Assistant && content.trim().is_empty() {
        return Err(LineProblem::EmptyAssistantContent(content_path));
    }
    let weight = weight(turn, &format!("{path}.weight"))?;
    Ok(Message {
        role,
        content,
        weight,
    })
}

fn weight(turn: &Object, path: &str) -> Result<Option<f32>, LineProblem> {
    match turn.get("weight") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => match value.as_f64() {
            Some(w) if w == 0.0 || w == 1.0 => Ok(Some(w as f32)),
            Some(_) => Err(LineProblem::InvalidWeight(path.to_owned())),
            None => Err(wrong_type(path, "a number", value)),
        },
    }
}

fn check_turns(messages: &[Message]) -> Result<(), LineProblem> {
    let assistant_turns = || messages.iter().filter(|m| m.role == Role::Assistant);
    if assistant_turns().next().is_none() {
        return Err(LineProblem::NoAssistantTurn);
    }
    if assistant_turns().all(|m| m.weight == Some(0.0)) {
        return Err(LineProblem::AllWeightsZero);
    }
    let last = messages.last().map(|m| m.role).unwrap_or(Role::Assistant);
    if last != Role::Assistant {
        return Err(LineProblem::LastTurnNotAssistant(last.as_str()));
    }
    Ok(())
}

fn parse_prompt_completion(object: &Object) -> Result<(Conversation, usize), LineProblem> {
    let prompt = string(object, "prompt", "prompt")?;
    let completion = string(object, "completion", "completion")?;
    if completion.trim().is_empty() {
        return Err(LineProblem::EmptyAssistantContent("completion".into()));
    }
    let conversation = Conversation {
        messages: vec![turn(Role::User, prompt), turn(Role::Assistant, completion)],
    };
    Ok((
        conversation,
        count_unknown(object, &["prompt", "completion"]),
    ))
}

fn parse_alpaca(object: &Object) -> Result<(Conversation, usize), LineProblem> {
    let instruction = string(object, "instruction", "instruction")?;
    let input = match object.get("input") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => return Err(wrong_type("input", "a string", other)),
    };
    let output = string(object, "output", "output")?;
    if output.trim().is_empty() {
        return Err(LineProblem::EmptyAssistantContent("output".into()));
    }
    // Alpaca's own prompt puts the input after the instruction, separated by a blank line.
    let prompt = if input.trim().is_empty() {
        instruction
    } else {
        format!("{instruction}\n\n{input}")
    };
    let conversation = Conversation {
        messages: vec![turn(Role::User, prompt), turn(Role::Assistant, output)],
    };
    Ok((
        conversation,
        count_unknown(object, &["instruction", "input", "output"]),
    ))
}

/// Keys that mark a line as a preference pair.
const PREFERENCE_KEYS: [&str; 4] = ["chosen", "rejected", "preferred_output", "non_preferred_output"];

/// One DPO example: a prompt and two replies to it, the preferred one first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The conversation so far, ending with a user turn.
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
}

impl PreferencePair {
    /// Returns the prompt followed by the chosen reply, as a supervised conversation.
    pub fn as_chosen_conversation(&self) -> Conversation {
        let mut messages = self.prompt.clone();
        messages.push(turn(Role::Assistant, self.chosen.clone()));
        Conversation { messages }
    }
}

/// Parses one preference line: OpenAI's format, whose `input.messages` is the prompt and whose
/// `preferred_output` and `non_preferred_output` each hold one assistant message, or
/// `{"prompt", "chosen", "rejected"}` with `prompt` a string (one user turn) or a message list;
/// a `prompt_messages` list there takes precedence over `prompt`.
pub fn parse_preference_line(line: usize, text: &str) -> Result<PreferencePair, LineError> {
    let at = |problem| LineError { line, problem };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|err| at(LineProblem::NotJson(err.to_string())))?;
    let serde_json::Value::Object(object) = value else {
        return Err(at(LineProblem::NotObject(type_name(&value))));
    };
    parse_preference(&object).map(|(pair, _)| pair).map_err(at)
}

/// Parses a whole preference dataset held in memory. Blank lines are skipped but counted.
pub fn parse_preference_dataset(bytes: &[u8]) -> Result<Vec<PreferencePair>, DatasetError> {
    let mut pairs = Vec::new();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let text = std::str::from_utf8(line).map_err(|_| DatasetError::NotUtf8(index + 1))?;
        let text = text.strip_suffix('\r').unwrap_or(text);
        let text = if index == 0 { text.strip_prefix('\u{feff}').unwrap_or(text) } else { text };
        if text.trim().is_empty() {
            continue;
        }
        pairs.push(parse_preference_line(index + 1, text)?);
    }
    if pairs.is_empty() {
        return Err(DatasetError::Empty(EmptyDataset));
    }
    Ok(pairs)
}

fn parse_preference(object: &Object) -> Result<(PreferencePair, usize), LineProblem> {
    let openai = object.contains_key("preferred_output") || object.contains_key("non_preferred_output") || object.contains_key("input");
    let (prompt, chosen, rejected, unknown) = if openai {
        let input = match field(object, "input", "input")? {
            serde_json::Value::Object(input) => input,
            other => return Err(wrong_type("input", "an object with messages", other)),
        };
        let prompt = message_list(field(input, "messages", "input.messages")?, "input.messages")?;
        let chosen = output_text(object, "preferred_output")?;
        let rejected = output_text(object, "non_preferred_output")?;
        let unknown = count_unknown(object, &["input", "preferred_output", "non_preferred_output"])
            + count_unknown(input, &["messages", "tools", "parallel_tool_calls"]);
        (prompt, (chosen, "preferred_output"), (rejected, "non_preferred_output"), unknown)
    } else {
        let prompt = match object.get("prompt_messages") {
            Some(value) if !value.is_null() => message_list(value, "prompt_messages")?,
            _ => match field(object, "prompt", "prompt")? {
                serde_json::Value::String(text) if text.trim().is_empty() => {
                    return Err(LineProblem::EmptyPrompt("prompt".into()))
                }
                serde_json::Value::String(text) => vec![turn(Role::User, text.clone())],
                list @ serde_json::Value::Array(_) => message_list(list, "prompt")?,
                other => return Err(wrong_type("prompt", "a string or a list of messages", other)),
            },
        };
        let chosen = string(object, "chosen", "chosen")?;
        let rejected = string(object, "rejected", "rejected")?;
        let unknown = count_unknown(object, &["prompt", "prompt_messages", "chosen", "rejected"]);
        (prompt, (chosen, "chosen"), (rejected, "rejected"), unknown)
    };
    for (text, path) in [&chosen, &rejected] {
        if text.trim().is_empty() {
            return Err(LineProblem::EmptyResponse((*path).into()));
        }
    }
    if chosen.0 == rejected.0 {
        return Err(LineProblem::IdenticalResponses(chosen.1.into(), rejected.1.into()));
    }
    let pair = PreferencePair {
        prompt,
        chosen: chosen.0,
        rejected: rejected.0,
    };
    Ok((pair, unknown))
}

/// Parses a prompt given as a list of messages, which must end with a user turn.
fn message_list(value: &serde_json::Value, path: &str) -> Result<Vec<Message>, LineProblem> {
    let serde_json::Value::Array(items) = value else {
        return Err(wrong_type(path, "a list of messages", value));
    };
    if items.is_empty() {
        return Err(LineProblem::EmptyMessages(path.into()));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{index}]");
        let serde_json::Value::Object(turn) = item else {
            return Err(wrong_type(&item_path, "an object", item));
        };
        messages.push(parse_message(turn, &item_path)?);
    }
    let last = messages.last().map(|m| m.role).unwrap_or(Role::User);
    if last != Role::User {
        return Err(LineProblem::PromptNotEndingWithUser(path.into(), last.as_str()));
    }
    Ok(messages)
}

/// Returns the text of OpenAI's `preferred_output` or `non_preferred_output`, a list that
/// contains one assistant message.
fn output_text(object: &Object, key: &str) -> Result<String, LineProblem> {
    let value = field(object, key, key)?;
    let serde_json::Value::Array(items) = value else {
        return Err(wrong_type(key, "a list with one assistant message", value));
    };
    let path = format!("{key}[0]");
    let Some(first) = items.first() else {
        return Err(LineProblem::EmptyMessages(key.into()));
    };
    let serde_json::Value::Object(message) = first else {
        return Err(wrong_type(&path, "an object", first));
    };
    // OpenAI's format names the role; a reply without one is taken as the assistant's.
    if let Some(role) = message.get("role") {
        let role_path = format!("{path}.role");
        let serde_json::Value::String(role) = role else {
            return Err(wrong_type(&role_path, "a string", role));
        };
        if role != "assistant" {
            return Err(LineProblem::ReplyNotAssistant { field: role_path, role: role.clone() });
        }
    }
    let content_path = format!("{path}.content");
    let content = string(message, "content", &content_path)?;
    if content.trim().is_empty() {
        return Err(LineProblem::EmptyResponse(content_path));
    }
    Ok(content)
}

fn turn(role: Role, content: String) -> Message {
    Message {
        role,
        content,
        weight: None,
    }
}

fn field<'a>(
    object: &'a Object,
    key: &str,
    path: &str,
) -> Result<&'a serde_json::Value, LineProblem> {
    match object.get(key) {
        None => Err(LineProblem::MissingField(path.to_owned())),
        Some(serde_json::Value::Null) => Err(LineProblem::NullField(path.to_owned())),
        Some(value) => Ok(value),
    }
}

fn string(object: &Object, key: &str, path: &str) -> Result<String, LineProblem> {
    match field(object, key, path)? {
        serde_json::Value::String(s) => Ok(s.clone()),
        other => Err(wrong_type(path, "a string", other)),
    }
}

fn wrong_type(path: &str, expected: &'static str, found: &serde_json::Value) -> LineProblem {
    LineProblem::WrongType {
        field: path.to_owned(),
        expected,
        found: type_name(found),
    }
}

fn type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> LineProblem {
        parse_line(1, text).unwrap_err().problem
    }

    #[test]
    fn chat_line_converts_with_weights() {
        let parsed = parse_line(
            1,
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello","weight":0},{"role":"user","content":"Again"},{"role":"assistant","content":"Hi again"}]}"#,
        )
        .unwrap();
        assert_eq!(parsed.format, DatasetFormat::Chat);
        assert_eq!(parsed.conversation.messages.len(), 5);
        assert_eq!(parsed.conversation.messages[2].weight, Some(0.0));
        assert_eq!(parsed.conversation.messages[4].weight, None);
    }

    #[test]
    fn prompt_completion_converts_to_two_turns() {
        let parsed =
            parse_line(1, r#"{"prompt":"2+2=","completion":"4","source":"math"}"#).unwrap();
        assert_eq!(parsed.format, DatasetFormat::PromptCompletion);
        assert_eq!(
            parsed.conversation.messages,
            vec![
                turn(Role::User, "2+2=".into()),
                turn(Role::Assistant, "4".into())
            ]
        );
        assert_eq!(parsed.unknown_keys, 1);
    }

    #[test]
    fn alpaca_joins_instruction_and_input() {
        let parsed = parse_line(
            1,
            r#"{"instruction":"Translate","input":"Hallo","output":"Hello"}"#,
        )
        .unwrap();
        assert_eq!(parsed.format, DatasetFormat::Alpaca);
        assert_eq!(
            parsed.conversation.messages[0].content,
            "Translate\n\nHallo"
        );
        let parsed = parse_line(1, r#"{"instruction":"Say hi","output":"Hi"}"#).unwrap();
        assert_eq!(parsed.conversation.messages[0].content, "Say hi");
    }

    #[test]
    fn unknown_keys_are_counted_not_rejected() {
        let parsed = parse_line(1, r#"{"messages":[{"role":"user","content":"a","name":"x"},{"role":"assistant","content":"b"}],"id":3}"#).unwrap();
        assert_eq!(parsed.unknown_keys, 2);
    }

    #[test]
    fn each_bad_line_names_its_problem() {
        let cases: &[(&str, LineProblem)] = &[
            ("{not json", LineProblem::NotJson(String::new())),
            ("[1,2]", LineProblem::NotObject("an array")),
            (
                r#"{"text":"hi"}"#,
                LineProblem::UnknownFormat("text".into()),
            ),
            (
                r#"{"completion":"hi"}"#,
                LineProblem::MissingField("prompt".into()),
            ),
            (r#"{"prompt":" "}"#, LineProblem::EmptyPrompt("prompt".into())),
            (
                r#"{"prompt":null,"completion":"x"}"#,
                LineProblem::NullField("prompt".into()),
            ),
            (
                r#"{"messages":"hi"}"#,
                LineProblem::WrongType {
                    field: "messages".into(),
                    expected: "a list of messages",
                    found: "a string",
                },
            ),
            (
                r#"{"messages":[{"role":"tool","content":"x"}]}"#,
                LineProblem::UnknownRole {
                    field: "messages[0].role".into(),
                    role: "tool".into(),
                },
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":" "}]}"#,
                LineProblem::EmptyAssistantContent("messages[1].content".into()),
            ),
            (
                r#"{"messages":[{"role":"system","content":"x"}]}"#,
                LineProblem::NoAssistantTurn,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y"},{"role":"system","content":"z"}]}"#,
                LineProblem::LastTurnNotAssistant("system"),
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y","weight":0}]}"#,
                LineProblem::AllWeightsZero,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y","weight":0.5}]}"#,
                LineProblem::InvalidWeight("messages[1].weight".into()),
            ),
            (
                r#"{"messages":[]}"#,
                LineProblem::EmptyMessages("messages".into()),
            ),
            (
                r#"{"instruction":"x","output":""}"#,
                LineProblem::EmptyAssistantContent("output".into()),
            ),
        ];
        for (text, expected) in cases {
            let found = problem(text);
            match (expected, &found) {
                (LineProblem::NotJson(_), LineProblem::NotJson(_)) => {}
                _ => assert_eq!(&found, expected, "line {text}"),
            }
        }
    }

    #[test]
    fn error_message_names_the_line() {
        let err = parse_line(7, r#"{"completion":"hi"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 7: missing required field 'prompt'"
        );
    }

    #[test]
    fn prompts_alone_parse_as_user_turns() {
        let parsed = parse_line(1, r#"{"prompt":"Hi there"}"#).unwrap();
        assert_eq!(parsed.format, DatasetFormat::Prompts);
        assert_eq!(parsed.conversation.messages, vec![turn(Role::User, "Hi there".into())]);

        let text = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}],"source":"x"}"#;
        let parsed = parse_line(1, text).unwrap();
        assert_eq!(parsed.format, DatasetFormat::Prompts);
        assert_eq!(parsed.conversation.messages.len(), 2);
        assert_eq!(parsed.unknown_keys, 1);
        assert_eq!(DatasetFormat::from_name("prompts"), Some(DatasetFormat::Prompts));
    }

    #[test]
    fn shared_prompts_file_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/distill_prompts.jsonl");
        let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("{path}: {err}"));
        let (conversations, summary) = parse_dataset(&bytes).unwrap();
        assert_eq!(summary.format, DatasetFormat::Prompts);
        assert_eq!(conversations.len(), 500);
        assert!(conversations.iter().all(|c| c.messages.last().unwrap().role == Role::User));
    }

    #[test]
    fn prompts_and_chat_lines_do_not_mix() {
        let bytes = concat!(
            r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"y"}]}"#,
            "\n",
            r#"{"prompt":"z"}"#,
        );
        let err = parse_dataset(bytes.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("prompts format"), "{err}");
    }

    #[test]
    fn validator_rejects_mixed_formats_at_the_line() {
        let mut validator = DatasetValidator::new();
        validator
            .push_line(r#"{"prompt":"a","completion":"b"}"#)
            .unwrap();
        validator.push_line("").unwrap();
        let err = validator
            .push_line(r#"{"instruction":"a","output":"b"}"#)
            .unwrap_err();
        assert_eq!(err.line, 3);
        assert!(matches!(
            err.problem,
            LineProblem::MixedFormats {
                expected: "prompt_completion",
                found: "alpaca"
            }
        ));
    }

    #[test]
    fn dataset_summary_counts_examples_not_blank_lines() {
        let (conversations, summary) =
            parse_dataset(b"{\"prompt\":\"a\",\"completion\":\"b\"}\n\n{\"prompt\":\"c\",\"completion\":\"d\",\"x\":1}\r\n").unwrap();
        assert_eq!(conversations.len(), 2);
        assert_eq!(summary.line_count, 2);
        assert_eq!(summary.unknown_keys, 1);
        assert_eq!(summary.format, DatasetFormat::PromptCompletion);
    }

    #[test]
    fn byte_order_mark_skipped_first_line_only() {
        let line = "{\"prompt\":\"a\",\"completion\":\"b\"}";
        let (conversations, summary) =
            parse_dataset(format!("\u{feff}{line}\n{line}\n").as_bytes()).unwrap();
        let second = parse_dataset(format!("{line}\n\u{feff}{line}\n").as_bytes());

        assert_eq!(conversations.len(), 2);
        assert_eq!(summary.line_count, 2);
        assert!(matches!(
            second,
            Err(DatasetError::Line(LineError { line: 2, .. }))
        ));
    }

    #[test]
    fn preference_formats_parse_to_one_pair() {
        let openai = r#"{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant", "content": "Hello!"}], "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}"#;
        let plain = r#"{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}"#;
        let listed = r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}"#;
        let preferred = r#"{"prompt": "ignored", "prompt_messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}"#;
        let expected = PreferencePair {
            prompt: vec![turn(Role::User, "Hi".into())],
            chosen: "Hello!".into(),
            rejected: "Go away.".into(),
        };
        for text in [openai, plain, listed, preferred] {
            assert_eq!(parse_preference_line(1, text).unwrap(), expected, "{text}");
            let parsed = parse_line(1, text).unwrap();
            assert_eq!(parsed.format, DatasetFormat::Preference);
            assert_eq!(parsed.conversation.messages.last().unwrap().content, "Hello!");
        }
    }

    #[test]
    fn bad_preference_lines_name_line_and_field() {
        let cases = [
            (r#"{"prompt": "Hi", "chosen": "Hello!"}"#, "line 3: missing required field 'rejected'"),
            (r#"{"prompt": "Hi", "chosen": " ", "rejected": "No"}"#, "line 3: field 'chosen' is an empty response"),
            (r#"{"prompt": "Hi", "chosen": "Yes", "rejected": ""}"#, "line 3: field 'rejected' is an empty response"),
            (r#"{"prompt": "Hi", "chosen": "Same", "rejected": "Same"}"#, "line 3: fields 'chosen' and 'rejected' are the same text, so the pair prefers nothing"),
            (r#"{"prompt": " ", "chosen": "Yes", "rejected": "No"}"#, "line 3: field 'prompt' is an empty prompt"),
            (
                r#"{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant", "content": ""}], "non_preferred_output": [{"role": "assistant", "content": "No"}]}"#,
                "line 3: field 'preferred_output[0].content' is an empty response",
            ),
            (
                r#"{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant", "content": "Yes"}]}"#,
                "line 3: missing required field 'non_preferred_output'",
            ),
            (
                r#"{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": [{"role": "assistant", "content": "Yes"}], "non_preferred_output": [{"role": "user", "content": "No"}]}"#,
                "line 3: field 'non_preferred_output[0].role' is \"user\"; a reply must be from the assistant",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "chosen": "A", "rejected": "B"}"#,
                "line 3: the last turn of 'prompt' is from the assistant; a prompt must end with a user turn",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(parse_preference_line(3, text).unwrap_err().to_string(), message);
        }
        let mut validator = DatasetValidator::new();
        validator.push_line(r#"{"prompt": "Hi", "chosen": "A", "rejected": "B"}"#).unwrap();
        let err = validator.push_line(r#"{"prompt": "Hi", "chosen": "A"}"#).unwrap_err();
        assert_eq!(err.to_string(), "line 2: missing required field 'rejected'");
    }

    #[test]
    fn shared_preference_file_parses() {
        let bytes = std::fs::read("../../../shared/data/pref_oasst.jsonl").expect("../shared/data/pref_oasst.jsonl is readable from the crate folder");
        let pairs = parse_preference_dataset(&bytes).unwrap();
        assert_eq!(pairs.len(), 348);
        assert_eq!(pairs[0].prompt, vec![turn(Role::User, "Write a song about Angela Merkel in the style of The Beatles.".into())]);
    }

    #[test]
    fn empty_dataset_is_rejected() {
        assert_eq!(
            parse_dataset(b"\n\n").unwrap_err(),
            DatasetError::Empty(EmptyDataset)
        );
    }
}
