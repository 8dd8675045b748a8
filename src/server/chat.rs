//! `POST /v1/chat/completions`: messages through the chat template, then
//! either one `chat.completion` or a stream of `chat.completion.chunk`s
//! (a role delta per choice, content deltas, a final chunk with
//! `finish_reason`, the usage chunk when asked).
//!
//! Each choice's text goes through a [`OutputParser`] (thinking into
//! `reasoning_content`, calls into `tool_calls`), the same one whether the
//! response is streamed or not, so the two agree.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::Event;
use crate::tools::parse::{
    with_marker, Delta as ParsedDelta, OutputParser, Parsed, ParserConfig, ToolCall,
};

use super::error::AppError;
use super::generation;
use super::logprobs::chat_entry;
use super::request::ChatRequest;
use super::response::{
    chat_finish_reason, AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion,
    ChatLogprobs, Delta, FunctionDelta, FunctionOut, Meta, ToolCallDelta, ToolCallOut, Usage,
};
use super::sse::{self, to_json, Chunker};
use super::state::AppState;
use super::validate;

pub async fn handler(
    State(state): State<AppState>,
    req: ChatRequest,
) -> Result<Response, AppError> {
    let ready = state.ready()?;
    let served = state.config().served_model_name.clone();
    let meta = Meta::new("chatcmpl", &served);
    let mut valid = {
        let ready = ready.clone();
        super::off_runtime(&state, move || validate::chat(req, &ready, &served)).await?
    };
    let receivers = generation::submit_all(&ready.engine, std::mem::take(&mut valid.requests))?;
    let choices = receivers.len();
    if valid.stream {
        let chunker = ChatChunker {
            meta,
            logprobs: valid.logprobs.is_some(),
            include_usage: valid.include_usage,
            prompt_tokens: valid.prompt_tokens(),
            completion_tokens: 0,
            choices,
            finished: 0,
            parsers: (0..choices)
                .map(|_| OutputParser::new(valid.parser.clone()))
                .collect(),
            markers: valid.special_markers.clone(),
        };
        return Ok(sse::respond(
            generation::merge(receivers),
            chunker,
            state.stop_signal(),
        ));
    }
    let outputs = generation::collect_all(receivers, state.stop_signal()).await?;
    let completion_tokens = outputs.iter().map(|o| o.usage.completion_tokens).sum();
    let body = ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        usage: Usage::new(valid.prompt_tokens(), completion_tokens),
        choices: outputs
            .into_iter()
            .enumerate()
            .map(|(index, o)| {
                let message = message(&valid.parser, &valid.special_markers, &o.pieces);
                let called = message.tool_calls.is_some();
                ChatChoice {
                    index,
                    logprobs: valid.logprobs.map(|_| ChatLogprobs {
                        content: o.logprobs.iter().map(chat_entry).collect(),
                    }),
                    finish_reason: chat_finish_reason(o.finish, called),
                    message,
                }
            })
            .collect(),
    };
    Ok(Json(body).into_response())
}

/// A whole choice's message, from its tokens.
fn message(
    cfg: &ParserConfig,
    markers: &[(u32, String)],
    pieces: &[(u32, String)],
) -> AssistantMessage {
    let parsed = Parsed::from_tokens(cfg.clone(), markers, pieces);
    let calls: Vec<ToolCallOut> = parsed.calls.into_iter().map(call_out).collect();
    // OpenAI sends `null` content beside calls, and a string otherwise.
    let content = if !calls.is_empty() && parsed.content.trim().is_empty() {
        None
    } else {
        Some(parsed.content)
    };
    AssistantMessage {
        role: "assistant",
        content,
        reasoning_content: (!parsed.reasoning.is_empty()).then_some(parsed.reasoning),
        tool_calls: (!calls.is_empty()).then_some(calls),
    }
}

fn call_out(c: ToolCall) -> ToolCallOut {
    ToolCallOut {
        id: c.id,
        kind: "function",
        function: FunctionOut {
            name: c.name,
            arguments: c.arguments,
        },
    }
}

/// Chat's stream chunks.
struct ChatChunker {
    meta: Meta,
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    choices: usize,
    finished: usize,
    /// One per choice.
    parsers: Vec<OutputParser>,
    markers: Vec<(u32, String)>,
}

impl ChatChunker {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        to_json(&ChatChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: self.meta.model.clone(),
            choices,
            usage,
        })
    }

    /// The stream deltas of parsed output. A call goes out in OpenAI's
    /// shape: its id, type and name (empty arguments), then its arguments,
    /// whole or (where a grammar enforces the calls) in pieces.
    fn deltas(parsed: Vec<ParsedDelta>) -> Vec<Delta> {
        let mut out = Vec::new();
        for p in parsed {
            match p {
                ParsedDelta::Content(text) => out.push(Delta {
                    content: Some(text),
                    ..Delta::default()
                }),
                ParsedDelta::Reasoning(text) => out.push(Delta {
                    reasoning_content: Some(text),
                    ..Delta::default()
                }),
                ParsedDelta::Call { index, call } => {
                    out.push(Self::call_start(index, call.id, call.name));
                    out.push(Self::call_arguments(index, call.arguments));
                }
                ParsedDelta::CallStart { index, id, name } => {
                    out.push(Self::call_start(index, id, name));
                }
                ParsedDelta::CallArguments { index, text } => {
                    out.push(Self::call_arguments(index, text));
                }
            }
        }
        out
    }

    fn call_start(index: usize, id: String, name: String) -> Delta {
        Delta {
            tool_calls: Some(vec![ToolCallDelta {
                index,
                id: Some(id),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name),
                    arguments: String::new(),
                },
            }]),
            ..Delta::default()
        }
    }

    fn call_arguments(index: usize, arguments: String) -> Delta {
        Delta {
            tool_calls: Some(vec![ToolCallDelta {
                index,
                id: None,
                kind: None,
                function: FunctionDelta {
                    name: None,
                    arguments,
                },
            }]),
            ..Delta::default()
        }
    }

    fn delta(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<&'static str>,
    ) -> String {
        self.chunk(
            vec![ChatChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason: finish,
            }],
            None,
        )
    }
}

impl Chunker for ChatChunker {
    fn start(&mut self) -> Vec<String> {
        (0..self.choices)
            .map(|index| {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Delta::default()
                };
                self.delta(index, delta, None, None)
            })
            .collect()
    }

    fn event(&mut self, choice: usize, event: Event) -> Result<Vec<String>, AppError> {
        Ok(match event {
            Event::PromptLogprobs(_) => Vec::new(),
            Event::Token { id, text, logprob } => {
                let text = with_marker(&self.markers, id, text);
                let parsed = match self.parsers.get_mut(choice) {
                    Some(parser) => parser.push(&text),
                    None => return Err(AppError::internal(format!("no choice {choice}"))),
                };
                let mut deltas = Self::deltas(parsed);
                let mut logprobs = self.logprobs.then(|| ChatLogprobs {
                    content: logprob.iter().map(chat_entry).collect(),
                });
                if deltas.is_empty() {
                    if logprobs.as_ref().is_none_or(|l| l.content.is_empty()) {
                        return Ok(Vec::new());
                    }
                    // Held-back text still has its token's logprob to send.
                    deltas.push(Delta::default());
                }
                deltas
                    .into_iter()
                    .map(|d| self.delta(choice, d, logprobs.take(), None))
                    .collect()
            }
            Event::Done { finish, usage, .. } => {
                self.finished += 1;
                self.completion_tokens += usage.completion_tokens;
                let (rest, called) = match self.parsers.get_mut(choice) {
                    Some(parser) => (parser.finish(), parser.calls() > 0),
                    None => return Err(AppError::internal(format!("no choice {choice}"))),
                };
                let mut chunks: Vec<String> = Self::deltas(rest)
                    .into_iter()
                    .map(|d| self.delta(choice, d, None, None))
                    .collect();
                let reason = chat_finish_reason(finish, called);
                chunks.push(self.delta(choice, Delta::default(), None, Some(reason)));
                chunks
            }
            Event::Error(message) => return Err(AppError::internal(message)),
        })
    }

    fn finished(&self) -> bool {
        self.finished == self.choices
    }

    fn end(&mut self) -> Vec<String> {
        if !self.include_usage {
            return Vec::new();
        }
        let usage = Usage::new(self.prompt_tokens, self.completion_tokens);
        vec![self.chunk(Vec::new(), Some(usage))]
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream;

    use super::*;
    use crate::engine::{Timing, Usage as EngineUsage};
    use crate::server::state::StopSignal;
    use crate::stopping::FinishReason;

    fn chunker(choices: usize) -> ChatChunker {
        tool_chunker(choices, None, false)
    }

    fn tool_chunker(
        choices: usize,
        tools: Option<crate::tools::ToolFormat>,
        reasoning: bool,
    ) -> ChatChunker {
        let cfg = ParserConfig {
            tools,
            reasoning,
            starts_in_reasoning: false,
            parallel: true,
            stream_arguments: false,
        };
        ChatChunker {
            meta: Meta::new("chatcmpl", "m"),
            logprobs: false,
            include_usage: true,
            prompt_tokens: 7,
            completion_tokens: 0,
            choices,
            finished: 0,
            parsers: (0..choices)
                .map(|_| OutputParser::new(cfg.clone()))
                .collect(),
            markers: vec![(99, "<|python_tag|>".into())],
        }
    }

    fn done_stop(n: usize) -> Event {
        match done(n) {
            Event::Done { usage, timing, .. } => Event::Done {
                finish: FinishReason::Stop,
                usage,
                timing,
            },
            other => other,
        }
    }

    fn special(id: u32) -> Event {
        Event::Token {
            id,
            text: String::new(),
            logprob: None,
        }
    }

    #[tokio::test]
    async fn streamed_calls_and_thinking_match_the_whole_message() {
        use crate::tools::ToolFormat;
        let pieces = [
            "<th",
            "ink>",
            "Need ",
            "weather.",
            "</think>",
            "\n\n",
            "<tool_",
            "call>\n{\"name\": ",
            "\"get_weather\", \"arguments\": {\"city\": ",
            "\"Paris\"}}\n</tool_call>",
        ];
        let mut events: Vec<(usize, Event)> = pieces.iter().map(|p| (0, token(p))).collect();
        events.push((0, done_stop(pieces.len())));
        let data = data(events, tool_chunker(1, Some(ToolFormat::Hermes), true)).await;
        let chunks: Vec<serde_json::Value> = data
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| json(d))
            .collect();
        let mut reasoning = String::new();
        let mut content = String::new();
        let mut arguments = String::new();
        let mut names = Vec::new();
        for c in &chunks {
            let d = &c["choices"][0]["delta"];
            reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
            content.push_str(d["content"].as_str().unwrap_or(""));
            if let Some(calls) = d["tool_calls"].as_array() {
                assert_eq!(calls[0]["index"], 0);
                if let Some(name) = calls[0]["function"]["name"].as_str() {
                    assert!(calls[0]["id"].as_str().unwrap_or("").starts_with("call_"));
                    assert_eq!(calls[0]["type"], "function");
                    names.push(name.to_owned());
                }
                arguments.push_str(calls[0]["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
        assert_eq!(reasoning, "Need weather.");
        assert_eq!(content, "");
        assert_eq!(names, vec!["get_weather"]);
        assert_eq!(arguments, r#"{"city":"Paris"}"#);
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned));
        assert_eq!(finish.as_deref(), Some("tool_calls"));

        // The non-streamed message of the same tokens.
        let cfg = ParserConfig {
            tools: Some(ToolFormat::Hermes),
            reasoning: true,
            starts_in_reasoning: false,
            parallel: true,
            stream_arguments: false,
        };
        let ids: Vec<(u32, String)> = pieces.iter().map(|p| (1, p.to_string())).collect();
        let m = message(&cfg, &[], &ids);
        assert_eq!(m.reasoning_content.as_deref(), Some("Need weather."));
        assert_eq!(m.content, None);
        let calls = m.tool_calls.expect("calls");
        assert_eq!(calls[0].function.arguments, arguments);
    }

    #[tokio::test]
    async fn a_skipped_special_marker_is_put_back_for_the_parser() {
        use crate::tools::ToolFormat;
        let events = vec![
            (0, special(99)),
            (0, token("{\"name\": \"f\", \"parameters\": {}}")),
            (0, done_stop(2)),
        ];
        let data = data(events, tool_chunker(1, Some(ToolFormat::Llama3Json), false)).await;
        let joined = data.join("\n");
        assert!(joined.contains("\"name\":\"f\""), "{joined}");
        assert!(
            joined.contains("\"finish_reason\":\"tool_calls\""),
            "{joined}"
        );
        assert!(!joined.contains("python_tag"), "{joined}");
    }

    fn token(text: &str) -> Event {
        Event::Token {
            id: 1,
            text: text.into(),
            logprob: None,
        }
    }

    fn done(n: usize) -> Event {
        Event::Done {
            finish: FinishReason::Length,
            usage: EngineUsage {
                prompt_tokens: 7,
                completion_tokens: n,
                cached_tokens: 0,
            },
            timing: Timing::default(),
        }
    }

    /// The `data:` payloads of a streamed response.
    async fn data(events: Vec<(usize, Event)>, c: ChatChunker) -> Vec<String> {
        let response = sse::respond(stream::iter(events), c, StopSignal::never());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
            .collect()
    }

    fn json(s: &str) -> serde_json::Value {
        serde_json::from_str(s).expect("json")
    }

    #[tokio::test]
    async fn chunks_come_in_openais_order() {
        let events = vec![
            (0, token("Hel")),
            (0, token("")),
            (0, token("lo")),
            (0, done(3)),
        ];
        let data = data(events, chunker(1)).await;
        assert_eq!(data.len(), 6, "{data:?}");
        assert_eq!(json(&data[0])["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(json(&data[1])["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(json(&data[2])["choices"][0]["delta"]["content"], "lo");
        assert_eq!(json(&data[3])["choices"][0]["finish_reason"], "length");
        let usage = json(&data[4]);
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 10);
        assert_eq!(data[5], "[DONE]");
    }

    #[tokio::test]
    async fn an_error_mid_stream_is_a_json_event_then_done() {
        let events = vec![
            (0, token("a")),
            (0, Event::Error("boom".into())),
            (0, token("never sent")),
        ];
        let data = data(events, chunker(1)).await;
        let error = json(&data[data.len() - 2]);
        assert_eq!(error["error"]["message"], "boom");
        assert_eq!(error["error"]["type"], "server_error");
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        assert!(!data.iter().any(|d| d.contains("never sent")));
    }

    #[tokio::test]
    async fn a_stop_ends_the_stream_with_an_error_then_done() {
        let state = AppState::new(
            crate::server::ServerConfig::new("m"),
            std::sync::Arc::new(crate::metrics::Metrics::default()),
        );
        state.stop_in_flight();
        // No event ever comes: only the stop ends this stream.
        let response = sse::respond(
            stream::pending::<(usize, Event)>(),
            chunker(1),
            state.stop_signal(),
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let data: Vec<String> = String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
            .collect();
        assert_eq!(data.len(), 3, "{data:?}");
        assert_eq!(json(&data[1])["error"]["code"], "server_shutting_down");
        assert_eq!(data[2], "[DONE]");
    }

    #[tokio::test]
    async fn a_stream_that_ends_early_reports_it() {
        let data = data(vec![(0, token("a")), (1, done(1))], chunker(2)).await;
        let error = json(&data[data.len() - 2]);
        assert!(error["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("engine stopped"));
    }
}
