//! The OpenAI-compatible HTTP server (`taper serve`): axum routes, OpenAI's
//! wire types, validation, SSE, and the one error → HTTP mapping.
//!
//! A request flows one way: [`request`] reads the body, [`validate`] turns
//! it into engine requests (on a blocking thread: templates and
//! tokenization are CPU work), [`generation`] submits them to the
//! [`EngineHandle`](crate::engine::EngineHandle) and gathers the events, and
//! [`chat`] / [`completions`] shape them into [`response`] bodies or
//! [`sse`] chunks. The server never touches tensors; the engine never sees
//! HTTP. Every error becomes HTTP in [`error`].
//!
//! [`router`] builds the whole app so tests can call it with `oneshot`;
//! [`listen::serve`] runs it on a socket with graceful shutdown.

mod chat;
mod completions;
pub mod error;
mod generation;
pub mod listen;
mod logprobs;
mod middleware;
pub mod request;
pub mod response;
mod routes;
mod sse;
pub mod state;
pub mod validate;
mod webui;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use error::AppError;
pub use middleware::loopback_hosts;
pub use state::{AppState, Defaults, Ready, ServerConfig, StopSignal};

/// Every route (the chat page too, unless [`ServerConfig::webui`] is off),
/// with foreign origins and hosts refused, the API key check on `/v1/*`,
/// the body limit, CORS when configured, and responses counted by status.
pub fn router(state: AppState) -> Router {
    let config = state.config();
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::handler))
        .route("/v1/completions", post(completions::handler))
        .route("/v1/models", get(routes::models))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ));
    let mut app = Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .merge(v1);
    if config.webui {
        app = app.merge(webui::routes());
    }
    app = app
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(config.body_limit));
    if let Some(cors) = middleware::cors(&config.cors_allow_origins) {
        app = app.layer(cors);
    }
    // Outside CORS, so a foreign origin's preflight is refused too; inside
    // the counting, so refusals show in /metrics.
    app.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::refuse_foreign,
    ))
    .layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::count_requests,
    ))
    .with_state(state)
}

/// Runs CPU work (templates, tokenization) off the async runtime, at most
/// [`AppState::validation_permits`] at once: the work is CPU-bound, and
/// each template render may hold its whole budget of memory (tens of MiB
/// under a hostile template), so the blocking pool's 512 threads must not
/// all render at once. A panic there is a 500 for this request; the
/// server keeps serving.
async fn off_runtime<T, F>(state: &AppState, f: F) -> Result<T, AppError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AppError> + Send + 'static,
{
    let permit = state
        .validation_permits()
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| AppError::internal(format!("a request task failed: {e}")))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|e| AppError::internal(format!("a request task failed: {e}")))?
}
