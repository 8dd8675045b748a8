//! The one place errors become HTTP. Every failure — a library [`Error`],
//! a body axum could not read or parse, an unknown route, a missing API key —
//! turns into an [`AppError`]: a status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`. Streams that fail after
//! their headers went out send the same body as an SSE event
//! ([`AppError::to_json`]).

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::Error;

/// OpenAI's `error` object.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a ErrorDetail,
}

/// An error on its way to the client.
#[derive(Debug, Clone)]
pub struct AppError {
    pub status: StatusCode,
    pub detail: ErrorDetail,
}

const INVALID_REQUEST: &str = "invalid_request_error";

impl AppError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        AppError {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind,
                param: None,
                code,
            },
        }
    }

    /// 400: a parameter is wrong; `param` names it.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, None, message).with_param(param)
    }

    /// 400: the body is not the JSON the endpoint expects.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, None, message)
    }

    /// 401: the API key is missing or wrong. OpenAI answers a bad key with
    /// this type and code; its clients map the status to their
    /// authentication error.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            INVALID_REQUEST,
            Some("invalid_api_key"),
            message,
        )
    }

    /// 404: the request names a model this server does not serve.
    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            Some("model_not_found"),
            format!("The model `{model}` does not exist. This server serves `{served}`."),
        )
        .with_param("model")
    }

    /// 404: no such route.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            Some("not_found"),
            format!("Invalid URL ({method} {path})"),
        )
    }

    /// 405: the route exists, the method does not.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID_REQUEST,
            Some("method_not_allowed"),
            format!("Method {method} is not allowed on {path}"),
        )
    }

    /// 413: the body is larger than the server accepts.
    pub fn too_large(limit: Option<usize>) -> Self {
        let message = match limit {
            Some(n) => format!("The request body must be at most {n} bytes."),
            None => "The request body is larger than the server accepts.".to_owned(),
        };
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID_REQUEST,
            Some("request_too_large"),
            message,
        )
    }

    /// 415: a JSON endpoint got a body that does not say it is JSON. Browsers
    /// send `text/plain` and form bodies cross-site without asking first;
    /// requiring `application/json` makes them ask (a CORS preflight).
    pub fn unsupported_media_type(given: Option<&str>) -> Self {
        let given = match given {
            Some(t) => format!("Given: {t:?}"),
            None => "None was given".to_owned(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            INVALID_REQUEST,
            Some("unsupported_media_type"),
            format!("The body must be sent with `Content-Type: application/json`. {given}."),
        )
    }

    /// 403: a browser page of another site (`Origin`), or a name the server
    /// does not answer to (`Host`, DNS rebinding).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, INVALID_REQUEST, Some(code), message)
    }

    /// 429: the engine's queue is full.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            message,
        )
    }

    /// 503: the model is still loading.
    pub fn loading() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("model_loading"),
            "The model is still loading; retry shortly.",
        )
    }

    /// 503: the server is shutting down and its grace period for requests
    /// in flight has run out.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("server_shutting_down"),
            "The server is shutting down and stopped this request before it finished.",
        )
    }

    /// 500: a fault inside the server, not the request's.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        eprintln!("internal error: {message}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            Some("internal_error"),
            message,
        )
    }

    /// Names the parameter at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.detail.param = Some(param.to_owned());
        self
    }

    /// Names the parameter at fault unless one is named already.
    pub fn or_param(self, param: &str) -> Self {
        if self.detail.param.is_some() {
            self
        } else {
            self.with_param(param)
        }
    }

    /// The error body as JSON, for an SSE event.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: &self.detail,
        })
        .unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
                .to_owned()
        })
    }
}

impl From<Error> for AppError {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidRequest(message) => {
                let param = backticked(&message);
                let e = AppError::bad_body(message);
                match param {
                    Some(p) => e.with_param(&p),
                    None => e,
                }
            }
            Error::ContextLength(message) => AppError::new(
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                Some("context_length_exceeded"),
                message,
            ),
            e @ (Error::ChatTemplateRaised { .. } | Error::ChatTemplateRender { .. }) => {
                AppError::invalid("messages", e.to_string())
            }
            Error::Overloaded(message) => AppError::overloaded(message),
            other => AppError::internal(other.to_string()),
        }
    }
}

/// The first `` `name` `` in a message: validation messages start with the
/// field they are about.
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    let name = &message[start..start + len];
    let is_field = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c));
    is_field.then(|| name.to_owned())
}

impl From<BytesRejection> for AppError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::too_large(None)
        } else {
            AppError::bad_body(rejection.body_text())
        }
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return AppError::too_large(None);
        }
        let text = rejection.body_text();
        // axum writes "<what failed>: <path>: <serde's message>"; the path
        // names the parameter.
        match &rejection {
            JsonRejection::JsonDataError(_) => {
                let detail = text.split_once(": ").map(|(_, rest)| rest).unwrap_or(&text);
                match detail.split_once(": ") {
                    Some((path, message)) if is_path(path) => {
                        let param =
                            match message.strip_prefix("missing field ").and_then(backticked) {
                                Some(field) => format!("{path}.{field}"),
                                None => path.to_owned(),
                            };
                        AppError::bad_body(format!("`{path}`: {message}")).with_param(&param)
                    }
                    _ => {
                        // A missing field has no path of its own; serde
                        // names it in backticks.
                        let e = AppError::bad_body(format!("Invalid request body: {detail}"));
                        match detail.strip_prefix("missing field ").and_then(backticked) {
                            Some(field) => e.with_param(&field),
                            None => e,
                        }
                    }
                }
            }
            JsonRejection::JsonSyntaxError(_) => {
                let detail = text.split_once(": ").map(|(_, r)| r).unwrap_or(&text);
                AppError::bad_body(format!("The body is not valid JSON: {detail}"))
            }
            _ => AppError::bad_body(text),
        }
    }
}

/// Whether serde_path_to_error's prefix is a field path (`messages[0].role`).
fn is_path(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.[]?".contains(c))
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.to_json(),
        )
            .into_response();
        let headers = response.headers_mut();
        match self.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_in_backticks_becomes_param() {
        let e = AppError::from(Error::InvalidRequest(
            "`top_p` must be in (0, 1]. Given: 3".into(),
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.detail.param.as_deref(), Some("top_p"));
    }

    #[test]
    fn context_errors_carry_their_code() {
        let e = AppError::from(Error::ContextLength("too long".into()));
        assert_eq!(e.detail.code, Some("context_length_exceeded"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn overload_is_429_and_faults_are_500() {
        assert_eq!(
            AppError::from(Error::Overloaded("full".into())).status,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            AppError::from(Error::Sampling("nan".into())).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn the_body_has_openais_shape() {
        let json: serde_json::Value =
            serde_json::from_str(&AppError::invalid("n", "`n` must be >= 1").to_json())
                .expect("json");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["param"], "n");
        assert!(json["error"]["code"].is_null());
    }
}
