//! Extractors whose rejections are [`ApiError`]s, so a malformed request still gets OpenAI's
//! error envelope instead of axum's plain-text rejection.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;

use crate::error::ApiError;

/// The one id segment of a route such as `/v1/files/{file_id}`, percent-decoded.
pub struct IdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(IdPath(id)),
            Err(rejection) if rejection.status().is_client_error() => {
                // Only a segment that is not UTF-8 once percent-decoded gets here; such an id
                // cannot exist, so it is a 404 like any other malformed id.
                Err(ApiError::not_found(
                    format!(
                        "{}; ids contain only ASCII letters, digits, '-' and '_'",
                        rejection.body_text()
                    ),
                    None,
                ))
            }
            Err(rejection) => Err(ApiError::internal(rejection)),
        }
    }
}
