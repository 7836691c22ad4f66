//! Extractors whose rejections are [`ApiError`]s, so a malformed request still gets OpenAI's
//! error envelope instead of axum's plain-text rejection.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;

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

/// The whole request body, limited by the route's `DefaultBodyLimit`.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(RawBody(bytes)),
            Err(rejection) => Err(body_error(rejection)),
        }
    }
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!(
            "the request body is larger than {} MiB; send a smaller JSON body",
            crate::MAX_JSON_BODY_BYTES >> 20
        ))
    } else {
        ApiError::invalid(
            format!("cannot read the request body: {}", rejection.body_text()),
            None,
            "invalid_body",
        )
    }
}
