//! `POST /v1/chat/completions`: messages through the chat template, then
//! either one `chat.completion` or a stream of `chat.completion.chunk`s
//! (a role delta per choice, content deltas, a final chunk with
//! `finish_reason`, the usage chunk when asked).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::engine::Event;

use super::error::AppError;
use super::generation;
use super::logprobs::chat_entry;
use super::request::ChatRequest;
use super::response::{
    finish_reason, AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion,
    ChatLogprobs, Delta, Meta, Usage,
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
            .map(|(index, o)| ChatChoice {
                index,
                logprobs: valid.logprobs.map(|_| ChatLogprobs {
                    content: o.logprobs.iter().map(chat_entry).collect(),
                }),
                finish_reason: finish_reason(o.finish),
                message: AssistantMessage {
                    role: "assistant",
                    content: o.text,
                },
            })
            .collect(),
    };
    Ok(Json(body).into_response())
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
                };
                self.delta(index, delta, None, None)
            })
            .collect()
    }

    fn event(&mut self, choice: usize, event: Event) -> Result<Vec<String>, AppError> {
        Ok(match event {
            Event::PromptLogprobs(_) => Vec::new(),
            Event::Token { text, logprob, .. } => {
                if text.is_empty() && logprob.is_none() {
                    return Ok(Vec::new());
                }
                let logprobs = self.logprobs.then(|| ChatLogprobs {
                    content: logprob.iter().map(chat_entry).collect(),
                });
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                vec![self.delta(choice, delta, logprobs, None)]
            }
            Event::Done { finish, usage, .. } => {
                self.finished += 1;
                self.completion_tokens += usage.completion_tokens;
                vec![self.delta(choice, Delta::default(), None, Some(finish_reason(finish)))]
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
        ChatChunker {
            meta: Meta::new("chatcmpl", "m"),
            logprobs: false,
            include_usage: true,
            prompt_tokens: 7,
            completion_tokens: 0,
            choices,
            finished: 0,
        }
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
