//! The data files of a local run, checked against the method as the API checks uploads for a
//! job: preference pairs for DPO, conversations otherwise, and prompts alone only for a
//! distillation training file.

use std::fs;
use std::path::Path;

use anyhow::{bail, Context};
use studio_core::dataset::{parse_dataset, parse_preference_dataset, Conversation, DatasetFormat, PreferencePair};

use crate::cli::TrainMethod;

/// The formats a DPO run accepts, for error messages.
const PREFERENCE_FORMATS: &str =
    "{\"prompt\", \"chosen\", \"rejected\"} or OpenAI's {\"input\", \"preferred_output\", \"non_preferred_output\"}";

/// The role of a data file in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FileRole {
    Training,
    Validation,
}

impl FileRole {
    fn flag(self) -> &'static str {
        match self {
            FileRole::Training => "--training-file",
            FileRole::Validation => "--validation-file",
        }
    }
}

/// Reads a file of conversations for a supervised or distillation run and returns them with
/// the file's format.
pub(super) fn read_conversations(
    path: &Path,
    role: FileRole,
    method: TrainMethod,
) -> anyhow::Result<(Vec<Conversation>, DatasetFormat)> {
    let bytes = read(path)?;
    let (conversations, summary) = parse_dataset(&bytes).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
    let (file, flag) = (path.display(), role.flag());
    match summary.format {
        DatasetFormat::Preference => bail!(
            "{flag} {file} contains preference pairs, which only the dpo method trains on; pass --method dpo or use a file of conversations"
        ),
        DatasetFormat::Prompts if role == FileRole::Validation => bail!(
            "{flag} {file} contains prompts without replies, but validation scores the replies a file contains; use conversations that end with an assistant reply"
        ),
        DatasetFormat::Prompts if method != TrainMethod::Distillation => bail!(
            "{flag} {file} contains prompts without replies, which only the distillation method uses (its teacher writes the replies); \
             use conversations that end with an assistant reply, or pass --method distillation --teacher-model MODEL"
        ),
        format => Ok((conversations, format)),
    }
}

/// Reads a file of preference pairs for a DPO run.
pub(super) fn read_pairs(path: &Path, role: FileRole) -> anyhow::Result<Vec<PreferencePair>> {
    let bytes = read(path)?;
    let (file, flag) = (path.display(), role.flag());
    match parse_preference_dataset(&bytes) {
        Ok(pairs) => Ok(pairs),
        // A file of another format gets a message that names its format, not its first
        // missing preference field.
        Err(err) => match parse_dataset(&bytes) {
            Ok((_, summary)) => bail!(
                "{flag} {file} is in the {} format, but a DPO run needs preference pairs: {PREFERENCE_FORMATS}",
                summary.format.as_str()
            ),
            Err(_) => bail!("{flag} {file}: {err}; a DPO run needs preference pairs: {PREFERENCE_FORMATS}"),
        },
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes conversations as OpenAI chat lines, `{"messages": [...]}`.
pub(super) fn write_conversations(path: &Path, conversations: &[Conversation]) -> anyhow::Result<()> {
    let mut text = String::new();
    for conversation in conversations {
        text.push_str(&serde_json::to_string(conversation)?);
        text.push('\n');
    }
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
