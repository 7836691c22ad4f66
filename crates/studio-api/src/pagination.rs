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
    pub limit: Option<u32>,
}

impl ListQuery {
    pub fn page_request(self) -> Result<PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid(
                format!("invalid 'limit' {limit}: expected an integer from 1 to {MAX_LIMIT}"),
                Some("limit"),
                "invalid_value",
            ));
        }
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
