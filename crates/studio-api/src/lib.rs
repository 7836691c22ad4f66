//! The Smart Studio REST API, a superset of OpenAI's fine-tuning API.
//!
//! [`app`] builds the whole router with its middleware; tests call it without a socket.

mod checkpoints;
mod completions;
mod download;
mod error;
mod estimate;
mod event_stream;
mod events;
mod extract;
mod files;
mod health;
mod idempotency;
mod jobs;
mod merge;
mod metrics;
mod models;
mod pagination;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderName;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};
use event_stream::StreamShutdown;
use studio_store::Services;
use tokio_util::sync::CancellationToken;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use files::MAX_FILENAME_BYTES;

/// The maximum size of a JSON request body, in bytes; uploads have their own limit.
pub const MAX_JSON_BODY_BYTES: usize = 2 << 20;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Builds the full router: every resource, request ids, tracing and server-error logging.
pub fn app(services: Services) -> Router {
    app_with_shutdown(services, CancellationToken::new())
}

/// Builds the router like [`app`], and ends every open event stream once `shutdown` is
/// cancelled. A graceful shutdown waits for open responses, and a stream of a job that has not
/// finished would otherwise keep it waiting until the client disconnects.
pub fn app_with_shutdown(services: Services, shutdown: CancellationToken) -> Router {
    Router::new()
        .merge(files::router())
        .merge(jobs::router())
        .merge(events::router())
        .merge(metrics::router())
        .merge(checkpoints::router())
        .merge(download::router())
        .merge(estimate::router())
        .merge(models::router())
        .merge(completions::router())
        .merge(health::router())
        .fallback(unknown_route)
        // Called after every route is merged, because it applies to the routes present.
        .method_not_allowed_fallback(method_not_allowed)
        // A route's own limit, such as the upload's, wins over this one.
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .layer(Extension(StreamShutdown(shutdown)))
        .layer(middleware::from_fn(log_server_errors))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(services)
}

fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id)
}

/// Logs each 5xx once, inside the request's span, with the cause [`ApiError`] left behind.
async fn log_server_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.status().is_server_error() {
        let detail = response
            .extensions()
            .get::<error::ServerErrorDetail>()
            .map(|d| d.0.as_str())
            .unwrap_or("");
        tracing::error!(
            status = response.status().as_u16(),
            error = detail,
            "request failed"
        );
    }
    response
}

/// Rejects an unsupported method on a known path; axum adds the `Allow` header.
async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "method {} is not allowed on {}; the Allow header lists the methods it accepts",
        request.method(),
        request.uri().path()
    ))
}

async fn unknown_route(request: Request) -> ApiError {
    ApiError::not_found(
        format!(
            "unknown route {} {}",
            request.method(),
            request.uri().path()
        ),
        None,
    )
}
