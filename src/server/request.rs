//! OpenAI's request bodies as they arrive, before validation.
//!
//! Each body is read once and parsed twice from the same bytes: once for the
//! fields both endpoints share ([`SamplingFields`]) and once for the
//! endpoint's own ([`ChatFields`], [`CompletionFields`]). Two flat structs
//! instead of `#[serde(flatten)]` keep serde's field path in every error, so
//! `{"temperature": "hot"}` is reported against `temperature`. Unknown fields
//! are ignored, as OpenAI's clients send fields this server does not use.
//!
//! Numbers a client could send out of range are read wide (`i64`) so that
//! validation, not serde, words the message.
//!
//! Fields of OpenAI's API that taper does not implement are the exception
//! to "unknown fields are ignored": [`UNSUPPORTED_CHAT_FIELDS`] lists them,
//! and a chat request that sets one gets a 400 naming it, since ignoring
//! it would hand the client an answer it did not ask for.
//! [`IGNORED_FIELDS`] lists those that are safe to ignore.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::error::AppError;
use super::state::AppState;

/// Fields shared by `/v1/chat/completions` and `/v1/completions`, with vLLM's
/// sampling extensions.
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct SamplingFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    /// Token id (as a string) → bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f32>>,
    /// Accepted and ignored (OpenAI uses it for abuse monitoring).
    #[allow(dead_code)]
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // vLLM extensions.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Fields of OpenAI's chat API that taper does not implement, with why: a
/// request setting one (to anything but `null`) is refused with a 400 that
/// names it. `modalities` is checked apart: `["text"]` is what taper does.
pub const UNSUPPORTED_CHAT_FIELDS: &[(&str, &str)] = &[
    ("audio", "audio output is not supported"),
    ("prediction", "predicted outputs are not supported"),
    ("web_search_options", "web search is not supported"),
    (
        "functions",
        "the legacy `functions` field is not supported; send `tools`",
    ),
    (
        "function_call",
        "the legacy `function_call` field is not supported; send `tool_choice`",
    ),
    (
        "reasoning_effort",
        "`reasoning_effort` is not supported; a thinking model's template may take `chat_template_kwargs` (e.g. {\"enable_thinking\": false})",
    ),
    ("verbosity", "`verbosity` is not supported"),
];

/// Fields accepted and ignored on every endpoint: bookkeeping for OpenAI's
/// platform that changes nothing in the output.
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// The fields only `/v1/chat/completions` has.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct ChatFields {
    pub messages: Vec<WireMessage>,
    /// The newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// Function tools, checked by validation (`{"type": "function",
    /// "function": {name, description, parameters}}`).
    pub tools: Option<Vec<serde_json::Value>>,
    /// `"none" | "auto" | "required" | {"type": "function", "function": {"name"}}`.
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    /// vLLM's extension: extra variables for the chat template.
    pub chat_template_kwargs: Option<serde_json::Value>,
    /// Only `["text"]` is supported.
    pub modalities: Option<Vec<String>>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    /// Absent or null for an assistant turn that only called tools.
    pub content: Option<Content>,
    /// An assistant turn's calls.
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
    /// The speaker's or the function's name.
    pub name: Option<String>,
    /// An earlier turn's thinking, as this server returned it.
    pub reasoning_content: Option<String>,
}

/// A call in an assistant turn sent back by the client.
#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: WireFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct WireFunctionCall {
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

/// A message's content: text, or a list of parts of which taper reads the
/// text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// The fields only `/v1/completions` has.
#[derive(Debug, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct CompletionFields {
    pub prompt: Prompt,
    pub echo: Option<bool>,
    /// Report this many alternatives per token (0 = only the chosen one).
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// `prompt`: text or token ids, one or several.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids or a list of token-id lists"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// Structured output, both endpoints: OpenAI's `response_format`, vLLM's
/// `structured_outputs` and its older `guided_*` fields. Kept as JSON
/// values so that validation, not serde, words what is wrong with them
/// (`validate/structured.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(expecting = "a JSON object")]
pub struct StructuredFields {
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    pub response_format: Option<serde_json::Value>,
    /// vLLM: `{"json" | "regex" | "choice" | "grammar" | "json_object": ...}`.
    pub structured_outputs: Option<serde_json::Value>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<serde_json::Value>,
    pub guided_choice: Option<serde_json::Value>,
    pub guided_grammar: Option<serde_json::Value>,
}

/// A `/v1/chat/completions` body.
#[derive(Debug)]
pub struct ChatRequest {
    pub chat: ChatFields,
    pub sampling: SamplingFields,
    pub structured: StructuredFields,
}

/// A `/v1/completions` body.
#[derive(Debug)]
pub struct CompletionRequest {
    pub completion: CompletionFields,
    pub sampling: SamplingFields,
    pub structured: StructuredFields,
}

impl FromRequest<AppState> for ChatRequest {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let bytes = read_body(req, state).await?;
        let request = ChatRequest {
            chat: parse(&bytes)?,
            sampling: parse(&bytes)?,
            structured: parse(&bytes)?,
        };
        refuse_unsupported(&bytes)?;
        Ok(request)
    }
}

impl FromRequest<AppState> for CompletionRequest {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, AppError> {
        let bytes = read_body(req, state).await?;
        Ok(CompletionRequest {
            completion: parse(&bytes)?,
            sampling: parse(&bytes)?,
            structured: parse(&bytes)?,
        })
    }
}

/// Reads the body, refusing at once one that is not declared JSON (415) or
/// whose declared length is over the limit (the router's `DefaultBodyLimit`
/// catches bodies that lie).
async fn read_body(req: Request, state: &AppState) -> Result<Bytes, AppError> {
    let content_type = req.headers().get(header::CONTENT_TYPE);
    if !content_type.is_some_and(is_json) {
        let given = content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        return Err(AppError::unsupported_media_type(given.as_deref()));
    }
    let limit = state.config().body_limit;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AppError::too_large(Some(limit)));
    }
    Bytes::from_request(req, state).await.map_err(|rejection| {
        let e = AppError::from(rejection);
        if e.status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            AppError::too_large(Some(limit))
        } else {
            e
        }
    })
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
///
/// Required because a browser sends a cross-site POST whose type is
/// `text/plain`, form-encoded or absent without a CORS preflight: any page
/// a user visits could otherwise make their local server generate. A JSON
/// type makes the browser ask first, and `--cors-allow-origin` answers.
fn is_json(value: &header::HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// Whether a field was set to something other than `null`, read without
/// building its value.
struct Set(bool);

impl<'de> Deserialize<'de> for Set {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Set(
            Option::<serde::de::IgnoredAny>::deserialize(d)?.is_some()
        ))
    }
}

/// A 400 for the first field of [`UNSUPPORTED_CHAT_FIELDS`] the body sets.
fn refuse_unsupported(bytes: &[u8]) -> Result<(), AppError> {
    let fields: HashMap<String, Set> = parse(bytes)?;
    for (name, why) in UNSUPPORTED_CHAT_FIELDS {
        if fields.get(*name).is_some_and(|set| set.0) {
            return Err(AppError::invalid(
                name,
                format!("`{name}`: {why}. Leave it out or set it to null."),
            ));
        }
    }
    Ok(())
}

/// Parses JSON with axum's extractor logic (serde path in the message); the
/// content type was checked by [`read_body`].
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    Json::<T>::from_bytes(bytes)
        .map(|Json(v)| v)
        .map_err(AppError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_type_names_its_field() {
        let e = parse::<SamplingFields>(br#"{"temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.detail.param.as_deref(), Some("temperature"), "{e:?}");
        assert!(e.detail.message.contains("temperature"), "{e:?}");
    }

    #[test]
    fn a_nested_wrong_type_names_its_path() {
        let e = parse::<ChatFields>(br#"{"messages": [{"role": 3}]}"#).unwrap_err();
        assert_eq!(e.detail.param.as_deref(), Some("messages[0].role"), "{e:?}");
    }

    #[test]
    fn a_missing_field_is_named() {
        let e = parse::<ChatFields>(br#"{}"#).unwrap_err();
        assert_eq!(e.detail.param.as_deref(), Some("messages"), "{e:?}");
        let e = parse::<ChatFields>(br#"{"messages": [{"content": "x"}]}"#).unwrap_err();
        assert_eq!(e.detail.param.as_deref(), Some("messages[0].role"), "{e:?}");
    }

    #[test]
    fn broken_json_is_a_bad_body() {
        let e = parse::<ChatFields>(br#"{"messages": "#).unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.detail.message.contains("not valid JSON"), "{e:?}");
    }

    #[test]
    fn prompts_of_every_shape_parse() {
        for body in [
            r#"{"prompt": "hi"}"#,
            r#"{"prompt": ["a", "b"]}"#,
            r#"{"prompt": [1, 2, 3]}"#,
            r#"{"prompt": [[1, 2], [3]]}"#,
        ] {
            parse::<CompletionFields>(body.as_bytes()).expect(body);
        }
        let e = parse::<CompletionFields>(br#"{"prompt": 3}"#).unwrap_err();
        assert_eq!(e.detail.param.as_deref(), Some("prompt"), "{e:?}");
    }

    #[test]
    fn only_json_content_types_are_json() {
        let json = |v: &'static str| is_json(&header::HeaderValue::from_static(v));
        assert!(json("application/json"));
        assert!(json("Application/JSON; charset=utf-8"));
        assert!(!json("text/plain"));
        assert!(!json("application/x-www-form-urlencoded"));
        assert!(!json("multipart/form-data; boundary=x"));
        assert!(!json("application/jsonp"));
    }

    #[test]
    fn unsupported_fields_are_named_and_ignored_ones_pass() {
        for (name, _) in UNSUPPORTED_CHAT_FIELDS {
            let body = format!(r#"{{"messages": [], "{name}": {{"x": 1}}}}"#);
            let e = refuse_unsupported(body.as_bytes()).expect_err(name);
            assert_eq!(e.detail.param.as_deref(), Some(*name));
            assert!(e.detail.message.contains(name), "{e:?}");
            let null = format!(r#"{{"messages": [], "{name}": null}}"#);
            refuse_unsupported(null.as_bytes()).expect("null is unset");
        }
        for name in IGNORED_FIELDS {
            let body = format!(r#"{{"messages": [], "{name}": "x"}}"#);
            refuse_unsupported(body.as_bytes()).expect(name);
        }
    }

    #[test]
    fn tool_turns_parse() {
        let body = br#"{"messages": [
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"}],
            "tools": [], "tool_choice": "auto", "parallel_tool_calls": false}"#;
        let chat = parse::<ChatFields>(body).expect("parses");
        let calls = chat.messages[0].tool_calls.as_ref().expect("calls");
        assert_eq!(calls[0].function.arguments, r#"{"a": 1}"#);
        assert_eq!(chat.messages[1].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(chat.parallel_tool_calls, Some(false));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        parse::<SamplingFields>(br#"{"frobnicate": true, "stop": "x"}"#).expect("parses");
    }
}
