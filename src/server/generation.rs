//! Between validation and the wire: submits a request's choices to the
//! engine, then either collects each choice's events into its final output
//! or merges every choice's events into one stream tagged by choice index.
//!
//! Receivers are dropped as soon as nobody wants them (an error, a
//! disconnected client); the engine cancels their sequences at its next step.

use futures_util::future::try_join_all;
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{EngineHandle, Event, Request, TokenLogprob, Usage};
use crate::stopping::FinishReason;

use super::error::AppError;
use super::state::StopSignal;

/// Queues every choice, or none: when one is refused (a full queue), the
/// receivers of those already queued are dropped, which cancels them.
pub fn submit_all(
    engine: &EngineHandle,
    requests: Vec<Request>,
) -> Result<Vec<UnboundedReceiver<Event>>, AppError> {
    requests
        .into_iter()
        .map(|r| engine.submit(r).map_err(AppError::from))
        .collect()
}

/// Everything one choice produced.
#[derive(Debug, Clone)]
pub struct ChoiceOutput {
    pub text: String,
    /// Each token's id and the text it completed (its concatenation is
    /// `text`): the tool-call parser needs the ids of special markers.
    pub pieces: Vec<(u32, String)>,
    /// Generated tokens' logprobs, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// The prompt's logprobs, when asked for (`None` for the first token).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub finish: FinishReason,
    pub usage: Usage,
}

/// Runs one choice to its end.
pub async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<ChoiceOutput, AppError> {
    let mut text = String::new();
    let mut pieces = Vec::new();
    let mut logprobs = Vec::new();
    let mut prompt_logprobs = None;
    while let Some(event) = rx.recv().await {
        match event {
            Event::PromptLogprobs(v) => prompt_logprobs = Some(v),
            Event::Token {
                id,
                text: piece,
                logprob,
            } => {
                text.push_str(&piece);
                pieces.push((id, piece));
                logprobs.extend(logprob);
            }
            Event::Done { finish, usage, .. } => {
                return Ok(ChoiceOutput {
                    text,
                    pieces,
                    logprobs,
                    prompt_logprobs,
                    finish,
                    usage,
                })
            }
            Event::Error(message) => return Err(AppError::internal(message)),
        }
    }
    Err(engine_stopped())
}

/// Runs every choice to its end; the first failure drops (cancels) the
/// rest, and so does `stop` firing (a 503: the server is shutting down).
pub async fn collect_all(
    receivers: Vec<UnboundedReceiver<Event>>,
    stop: StopSignal,
) -> Result<Vec<ChoiceOutput>, AppError> {
    tokio::select! {
        biased;
        () = stop.fired() => Err(AppError::shutting_down()),
        outputs = try_join_all(receivers.into_iter().map(collect)) => outputs,
    }
}

/// Every choice's events in arrival order, tagged with the choice's index.
pub fn merge(
    receivers: Vec<UnboundedReceiver<Event>>,
) -> impl Stream<Item = (usize, Event)> + Send + Unpin + 'static {
    stream::select_all(
        receivers
            .into_iter()
            .enumerate()
            .map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))),
    )
}

/// A choice's channel closed before it finished.
pub fn engine_stopped() -> AppError {
    AppError::internal("the engine stopped before the request finished")
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;

    #[tokio::test]
    async fn an_engine_error_is_a_500() {
        let (tx, rx) = unbounded_channel();
        tx.send(Event::Error("nan in logits".into())).expect("send");
        let e = collect(rx).await.expect_err("fails");
        assert_eq!(e.status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(e.detail.message, "nan in logits");
    }

    #[tokio::test]
    async fn a_channel_closed_before_done_is_a_500() {
        let (tx, rx) = unbounded_channel::<Event>();
        drop(tx);
        let e = collect(rx).await.expect_err("fails");
        assert_eq!(e.status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    }
}
