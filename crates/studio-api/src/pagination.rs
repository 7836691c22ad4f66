//! OpenAI's `after`/`limit` paging and the `{"object": "list", …}` envelope.

use serde::Deserialize;
use serde_json::{json, Value};
use studio_store::{Page, PageRequest};

use crate::error::ApiError;

pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    /// Kept as text, so `-1` or `abc` get the same message as `0` instead of serde's.
    pub limit: Option<String>,
}

impl ListQuery {
    pub fn page_request(self) -> Result<PageRequest, ApiError> {
        let limit = match self.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!(
                            "invalid 'limit' {text:?}: expected an integer from 1 to {MAX_LIMIT}"
                        ),
                        Some("limit"),
                        "invalid_value",
                    )
                })?,
        };
        Ok(PageRequest {
            after: self.after.filter(|after| !after.is_empty()),
            limit,
        })
    }
}

/// Renders a page with `render` for each item.
pub fn list_object<T>(page: Page<T>, render: impl Fn(&T) -> Value) -> Value {
    json!({
        "object": "list",
        "data": page.data.iter().map(render).collect::<Vec<_>>(),
        "has_more": page.has_more,
    })
}
