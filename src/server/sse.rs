//! Streamed responses as server-sent events. A [`Chunker`] turns each
//! engine event into OpenAI chunks (JSON strings); [`respond`] drives it and
//! frames the result: chunks, then `data: [DONE]`. A failure after the
//! headers went out is sent as one `data: {"error": {...}}` event, since
//! clients parse every `data:` line as JSON, followed by `[DONE]`.
//!
//! The body stream owns the engine receivers: when the client disconnects,
//! hyper drops the body, the receivers go with it, and the engine cancels
//! the generation at its next step. When the server's shutdown grace period
//! runs out ([`StopSignal`]), the stream ends the same way as on a failure:
//! an error event, then `[DONE]`, then the end of the body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Serialize;

use crate::engine::Event;

use super::error::AppError;
use super::generation::engine_stopped;
use super::state::StopSignal;

/// Turns one request's engine events into OpenAI stream chunks.
pub trait Chunker: Send + 'static {
    /// Chunks to send before any engine event.
    fn start(&mut self) -> Vec<String>;
    /// Chunks for an event of choice `choice`; an error ends the stream.
    fn event(&mut self, choice: usize, event: Event) -> Result<Vec<String>, AppError>;
    /// Whether every choice has finished.
    fn finished(&self) -> bool;
    /// Chunks after every choice finished (the usage chunk).
    fn end(&mut self) -> Vec<String>;
}

/// Serializes a chunk; our types always serialize, but a failure becomes an
/// error event rather than a panic.
pub fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value)
        .unwrap_or_else(|e| AppError::internal(format!("serializing a chunk: {e}")).to_json())
}

struct Driver<S, C> {
    /// `None` once the stream has ended (receivers dropped).
    events: Option<S>,
    chunker: C,
    queue: VecDeque<String>,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<S, C> Driver<S, C> {
    fn close(&mut self) {
        self.events = None;
        self.queue.push_back("[DONE]".to_owned());
    }
}

/// The SSE response for a stream of `(choice, event)`, ended early when
/// `stop` fires.
pub fn respond<S, C>(events: S, mut chunker: C, stop: StopSignal) -> Response
where
    S: Stream<Item = (usize, Event)> + Send + Unpin + 'static,
    C: Chunker,
{
    let queue = VecDeque::from(chunker.start());
    let driver = Driver {
        events: Some(events),
        chunker,
        queue,
        stop: Box::pin(stop.fired()),
    };
    let body = stream::unfold(driver, |mut d| async move {
        loop {
            if let Some(data) = d.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), d));
            }
            let events = d.events.as_mut()?;
            // The stop signal first: once it fires, nothing more is sent.
            let next = tokio::select! {
                biased;
                () = &mut d.stop => {
                    d.queue.push_back(AppError::shutting_down().to_json());
                    d.close();
                    continue;
                }
                next = events.next() => next,
            };
            match next {
                Some((choice, event)) => match d.chunker.event(choice, event) {
                    Ok(chunks) => {
                        d.queue.extend(chunks);
                        if d.chunker.finished() {
                            let end = d.chunker.end();
                            d.queue.extend(end);
                            d.close();
                        }
                    }
                    Err(e) => {
                        d.queue.push_back(e.to_json());
                        d.close();
                    }
                },
                None => {
                    d.queue.push_back(engine_stopped().to_json());
                    d.close();
                }
            }
        }
    });
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}
