//! The small routes — `/health`, `/metrics`, `/v1/models` — and the
//! answers for unknown routes and wrong methods, so those get OpenAI's
//! error shape too.

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::AppError;
use super::response::{ModelCard, ModelList};
use super::state::AppState;

/// 200 once the model is loaded, 503 while it loads.
pub async fn health(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

/// Prometheus' text format; the running and waiting gauges are the
/// engine's own.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics().render(),
    )
        .into_response()
}

/// The one model this server serves.
pub async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, AppError> {
    let ready = state.ready()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.config().served_model_name.clone(),
            object: "model",
            created: ready.created,
            owned_by: "taper",
            max_model_len: ready.context_len,
        }],
    }))
}

pub async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::route_not_found(method.as_str(), uri.path())
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> AppError {
    AppError::method_not_allowed(method.as_str(), uri.path())
}
