//! The API's one error type: it decides the status code and OpenAI's error envelope
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::QueryRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use studio_core::{InvalidId, SpecError};
use studio_store::{CatalogError, StoreError};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The `Retry-After` of a 503, in seconds, which the `openai` Python SDK waits before it retries.
// NOTE: a guess at how long a Postgres restart takes, not a measurement.
pub const RETRY_AFTER_SECONDS: u64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or contradicts the current state. Never 409, because
    /// OpenAI's SDKs retry 409 and these conflicts do not go away on retry.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<String>,
    },
    /// 405: the route exists but not with this HTTP method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: the request body is larger than the route accepts.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 503 with `Retry-After`: the database cannot be reached, for example while it restarts.
    #[error("the service is temporarily unavailable because its database cannot be reached; retry after {RETRY_AFTER_SECONDS} seconds")]
    Unavailable(#[source] BoxError),
    #[error("internal server error")]
    Internal(#[source] BoxError),
}

/// The cause of a 5xx response, left in the response extensions for the logging middleware,
/// so the error is logged once with the request's span.
#[derive(Clone, Debug)]
pub struct ServerErrorDetail(pub String);

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>, code: &'static str) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
            code: Some(code),
        }
    }

    pub fn not_found(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::NotFound {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    pub fn internal(err: impl Into<BoxError>) -> Self {
        ApiError::Internal(err.into())
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let (error_type, param, code) = match &self {
            ApiError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", param.clone(), *code)
            }
            ApiError::NotFound { param, .. } => {
                ("invalid_request_error", param.clone(), Some("not_found"))
            }
            ApiError::MethodNotAllowed(_) => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", None, Some("body_too_large")),
            ApiError::Unavailable(_) => ("server_error", None, Some("service_unavailable")),
            ApiError::Internal(_) => ("server_error", None, Some("internal_error")),
        };
        let body = json!({"error": {"message": self.to_string(), "type": error_type, "param": param, "code": code}});
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if status.is_server_error() {
            response
                .extensions_mut()
                .insert(ServerErrorDetail(error_chain(&self)));
        }
        response
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { .. } => ApiError::not_found(err.to_string(), None),
            StoreError::Conflict(message) => ApiError::invalid(message, None, "conflict"),
            StoreError::Unavailable(_) => ApiError::Unavailable(err.into()),
            StoreError::Other { .. } => ApiError::Internal(err.into()),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(err: SpecError) -> Self {
        ApiError::InvalidRequest {
            code: Some(err.code()),
            param: err.param,
            message: err.message,
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(err: CatalogError) -> Self {
        match err {
            CatalogError::NotFound { .. } => {
                ApiError::invalid(err.to_string(), Some("model"), "model_not_found")
            }
            CatalogError::Unreadable { .. } => ApiError::Internal(err.into()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(rejection.body_text(), None, "invalid_query")
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> Self {
        ApiError::invalid(
            format!(
                "{}; send multipart/form-data with the fields 'file' and 'purpose'",
                rejection.body_text()
            ),
            None,
            "invalid_multipart",
        )
    }
}

impl From<MultipartError> for ApiError {
    fn from(err: MultipartError) -> Self {
        ApiError::invalid(
            format!("invalid multipart body: {}", err.body_text()),
            None,
            "invalid_multipart",
        )
    }
}

/// Parses an id from the path; a malformed id cannot exist, so it is a 404 like an unknown one.
pub fn parse_path_id<T>(
    value: &str,
    parse: impl Fn(&str) -> Result<T, InvalidId>,
) -> Result<T, ApiError> {
    parse(value).map_err(|err| ApiError::not_found(err.to_string(), None))
}
