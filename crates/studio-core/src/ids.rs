//! Resource ids with OpenAI's prefixes (`file-`, `ftjob-`, `ftevent-`, `ftckpt-`).
//!
//! The part after the prefix is a UUIDv7 in simple (hex) form, so ids sort roughly by creation
//! time and never collide across processes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An id string that does not have the expected prefix or shape.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} id {}: expected {prefix} followed by letters, digits, '-' or '_'",
    quoted_start(.value)
)]
pub struct InvalidId {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub value: String,
}

/// Quotes an id for a message. A long one is cut to its first 80 characters and its length, so
/// a megabyte id is not sent back in the error.
fn quoted_start(value: &str) -> String {
    const MAX_CHARS: usize = 80;
    let length = value.chars().count();
    if length <= MAX_CHARS {
        return format!("{value:?}");
    }
    let start: String = value.chars().take(MAX_CHARS).collect();
    format!("{start:?}… ({length} characters)")
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// Generates a fresh id.
            pub fn new() -> Self {
                Self(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()))
            }

            /// Parses an id a client sent, checking the prefix and the characters.
            pub fn parse(value: &str) -> Result<Self, InvalidId> {
                let rest = value.strip_prefix($prefix).unwrap_or("");
                let well_formed = !rest.is_empty()
                    && rest.len() <= 64
                    && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if well_formed {
                    Ok(Self(value.to_owned()))
                } else {
                    Err(InvalidId { kind: $kind, prefix: $prefix, value: value.to_owned() })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

prefixed_id!(
    /// The id of an uploaded file, `file-…`.
    FileId, "file-", "file"
);
prefixed_id!(
    /// The id of a fine-tuning job, `ftjob-…`.
    JobId, "ftjob-", "fine-tuning job"
);
prefixed_id!(
    /// The id of a fine-tuning job event, `ftevent-…`.
    EventId, "ftevent-", "event"
);
prefixed_id!(
    /// The id of a fine-tuning checkpoint, `ftckpt-…`.
    CheckpointId, "ftckpt-", "checkpoint"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_id_has_prefix_and_parses_back() {
        let id = JobId::new();
        assert!(id.as_str().starts_with("ftjob-"));
        assert_eq!(JobId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn parse_rejects_wrong_prefix() {
        let err = FileId::parse("ftjob-abc").unwrap_err();
        assert_eq!(err.prefix, "file-");
    }

    #[test]
    fn parse_rejects_empty_rest_and_odd_characters() {
        assert!(FileId::parse("file-").is_err());
        assert!(FileId::parse("file-../etc").is_err());
        assert!(FileId::parse("file-abc/def").is_err());
    }

    #[test]
    fn new_ids_sort_by_creation() {
        let first = EventId::new();
        let second = EventId::new();
        assert!(first < second);
    }
}
