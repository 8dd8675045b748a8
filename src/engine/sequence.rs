//! One request inside the engine: its tokens, its KV cache and blocks, and
//! the per-sequence state sampling and streaming carry from step to step
//! (sampler, detokenizer, stop strings). The scheduler moves sequences
//! between the queue and the running batch; a preempted sequence keeps all
//! of this but its cache.

use std::time::Instant;

use super::{Request, Sink, TokenLogprob, Usage};
use crate::constraint::Constraint;
use crate::kv_cache::SeqKvCache;
use crate::sampling::Sampler;
use crate::stopping::StopStrings;
use crate::tokenizer::StreamDecoder;

pub(super) struct Sequence {
    pub(super) id: u64,
    pub(super) request: Request,
    pub(super) sink: Box<dyn Sink>,
    /// The prompt and every token generated so far. The cache holds the
    /// first `cache.len()`; the rest are computed in the coming steps (a
    /// prompt in chunks, then one token a step; all of them again after a
    /// preemption).
    pub(super) tokens: Vec<u32>,
    pub(super) cache: SeqKvCache,
    /// KV blocks reserved for this sequence (its cache's buffers).
    pub(super) blocks: usize,
    pub(super) sampler: Sampler,
    /// The request's output constraint, advanced with every token kept.
    /// A preempted sequence keeps it: it samples again only once its cache
    /// has caught up with every token it kept, so the matcher never needs
    /// to rewind.
    pub(super) constraint: Option<Constraint>,
    pub(super) generated: usize,
    pub(super) decoder: StreamDecoder,
    pub(super) stops: StopStrings,
    pub(super) usage: Usage,
    /// Prompt logprobs gathered chunk by chunk, sent with the last chunk.
    pub(super) prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub(super) prompt_logprobs_sent: bool,
    pub(super) submitted: Instant,
    pub(super) first_token: Option<Instant>,
    /// Set when the sequence is done, for removal after the step.
    pub(super) finished: bool,
}

impl Sequence {
    /// Tokens known but not yet in the cache.
    pub(super) fn todo(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    /// Whether this sequence still owes its caller prompt logprobs, and so
    /// needs the logits of every prompt token.
    pub(super) fn wants_prompt_logprobs(&self) -> bool {
        self.request.prompt_logprobs && !self.prompt_logprobs_sent
    }
}
