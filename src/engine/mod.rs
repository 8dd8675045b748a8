//! The one decode loop. Every caller — the CLI, the server, the benchmark —
//! hands the engine [`Request`]s with a [`Sink`] for their events; each
//! [`Engine::step`] runs one forward pass over the running sequences and
//! sends each sequence's new text to its sink.
//!
//! A step is planned under two budgets. Tokens: every sequence with one
//! token left to compute (a decode) takes it first, then sequences part-way
//! through their prompt, oldest first, then newly admitted ones take prompt
//! chunks until `max_batched_tokens` is used, so a long prompt is computed
//! over several steps instead of stalling everyone else's next token.
//! Memory: KV is counted in blocks of `block_size` positions ([`blocks`]);
//! admission reserves a prompt's blocks, a decode reserves a block when it
//! crosses into one; when none is free the least recently used cached prefix
//! is evicted, then the youngest running sequence is preempted (its cache
//! dropped, itself put back at the head of the queue to be recomputed with
//! what it generated so far; nothing already sent is sent again).
//!
//! A finished sequence's cache goes to the [`prefix_cache`]; a new request
//! whose prompt starts with the same whole blocks (a chat's earlier turns, a
//! shared system prompt) starts from a copy of them.
//!
//! [`handle`] runs an engine on its own thread behind a cloneable handle for
//! async callers.
//!
//! The files split the engine by role: `sequence.rs` (a request's state
//! inside the engine), `scheduler.rs` (who computes what each step, under
//! the token and KV budgets), `step.rs` (the batch and the forward pass),
//! `output.rs` (logits → sampled token → committed token and events).

pub mod blocks;
pub mod handle;
mod output;
mod prefix_cache;
mod scheduler;
mod sequence;
mod step;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::constraint::Constraint;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::sampling::{Sampler, SamplingParams};
use crate::stopping::{FinishReason, StopConditions, StopStrings};
use crate::tokenizer::StreamDecoder;
use crate::{Error, Result};

pub use handle::EngineHandle;
use prefix_cache::PrefixCache;
use sequence::Sequence;

/// What a caller asks the engine to generate.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (already templated and tokenized).
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// `Some(k)`: report each generated token's logprob and its top `k`.
    pub logprobs: Option<usize>,
    /// Report the logprob of every prompt token after the first (echo).
    pub prompt_logprobs: bool,
    /// A compiled structured-output constraint ([`Pipeline::compile_constraint`]):
    /// only tokens it allows are sampled, and the sequence ends (`stop`)
    /// once its grammar is complete.
    pub constraint: Option<Constraint>,
}

/// A token's log-probability, with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token's own text (special tokens included).
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(u32, String, f32)>,
}

/// Token counts for OpenAI's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// Timing of one request, measured by the engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// From submission (waiting in the queue included) to the first token.
    pub prefill_secs: f64,
    /// From the first token to the last.
    pub decode_secs: f64,
}

/// What the engine tells a request's caller.
#[derive(Debug, Clone)]
pub enum Event {
    /// Logprobs of the prompt tokens (only when asked; sent once, first).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// A generated token and the text it completes. The text may be empty
    /// (an incomplete character, or text held back by a stop string).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Generation ended.
    Done {
        finish: FinishReason,
        usage: Usage,
        timing: Timing,
    },
    /// Generation failed; no more events follow.
    Error(String),
}

/// Where a request's events go. Returning `false` means nobody is listening
/// any more (a disconnected client, Ctrl-C): the engine cancels the request
/// and frees its cache at once.
pub trait Sink: Send {
    fn send(&mut self, event: Event) -> bool;

    /// Whether nobody listens any more, known without sending: lets the
    /// engine drop a request that is waiting or part-way through its prompt
    /// (and so has nothing to send yet).
    fn is_closed(&self) -> bool {
        false
    }
}

impl<F: FnMut(Event) -> bool + Send> Sink for F {
    fn send(&mut self, event: Event) -> bool {
        self(event)
    }
}

/// Limits on what the engine holds and computes at once.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Sequences in one forward pass.
    pub max_batch: usize,
    /// Tokens one forward pass computes at most: one for each decoding
    /// sequence (these always run), then prompt chunks up to this total.
    pub max_batched_tokens: usize,
    /// Bytes of KV cache; `None`: [`blocks::default_budget_bytes`].
    pub kv_cache_bytes: Option<usize>,
    /// Positions per KV block, the unit of accounting and prefix sharing.
    pub block_size: usize,
    /// Keep finished sequences' KV for requests sharing their prefix.
    pub prefix_cache: bool,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            max_batch: 16,
            max_batched_tokens: 512,
            kv_cache_bytes: None,
            block_size: blocks::DEFAULT_BLOCK_SIZE,
            prefix_cache: true,
        }
    }
}

/// How the KV budget came out for a model: for logs and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBudget {
    pub block_size: usize,
    pub bytes_per_block: usize,
    pub total_blocks: usize,
}

impl KvBudget {
    pub fn bytes(&self) -> usize {
        self.total_blocks * self.bytes_per_block
    }

    pub fn positions(&self) -> usize {
        self.total_blocks * self.block_size
    }
}

/// The scheduler and decode loop, driven by [`Engine::step`].
pub struct Engine {
    pipeline: Arc<Pipeline>,
    limits: EngineLimits,
    budget: KvBudget,
    /// Sequences waiting for admission; preempted ones go back to the front.
    waiting: VecDeque<Sequence>,
    /// Admitted sequences, oldest first.
    running: Vec<Sequence>,
    prefix: PrefixCache,
    next_id: u64,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub fn new(pipeline: Arc<Pipeline>, limits: EngineLimits, metrics: Arc<Metrics>) -> Self {
        let mut limits = limits;
        limits.max_batch = limits.max_batch.max(1);
        limits.max_batched_tokens = limits.max_batched_tokens.max(1);
        limits.block_size = limits.block_size.max(1);
        let model = &pipeline.model;
        let bytes_per_block = blocks::bytes_per_position(model) * limits.block_size;
        let bytes = limits
            .kv_cache_bytes
            .unwrap_or_else(|| blocks::default_budget_bytes(model, limits.max_batch));
        let budget = KvBudget {
            block_size: limits.block_size,
            bytes_per_block,
            total_blocks: bytes / bytes_per_block.max(1),
        };
        let engine = Engine {
            pipeline,
            limits,
            budget,
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix: PrefixCache::new(limits.block_size),
            next_id: 0,
            metrics,
        };
        engine.update_gauges();
        engine
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// The KV budget in blocks.
    pub fn kv_budget(&self) -> KvBudget {
        self.budget
    }

    /// KV blocks in use: by running sequences, and by the prefix cache.
    pub fn kv_blocks_used(&self) -> (usize, usize) {
        (
            self.running.iter().map(|s| s.blocks).sum(),
            self.prefix.blocks(),
        )
    }

    /// Queues a request; its events go to `sink`. Returns its id.
    pub fn submit(&mut self, mut request: Request, sink: Box<dyn Sink>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut sampler = Sampler::new(request.sampling.clone());
        sampler.observe_prompt(&request.prompt);
        let usage = Usage {
            prompt_tokens: request.prompt.len(),
            ..Usage::default()
        };
        self.waiting.push_back(Sequence {
            id,
            tokens: request.prompt.clone(),
            cache: self.pipeline.model.new_cache(),
            blocks: 0,
            sampler,
            constraint: request.constraint.take(),
            generated: 0,
            decoder: StreamDecoder::new(true),
            stops: StopStrings::new(&request.stop.stop_strings),
            usage,
            prompt_logprobs: None,
            prompt_logprobs_sent: false,
            submitted: Instant::now(),
            first_token: None,
            finished: false,
            request,
            sink,
        });
        self.update_gauges();
        id
    }

    /// Whether there is anything left to do.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting for a place in the batch.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Runs until every request is done.
    pub fn run_to_completion(&mut self) {
        while !self.is_idle() {
            self.step();
        }
    }

    /// Runs one request to completion, sending its events to `sink`; the
    /// prefix cache is kept for the next (the CLI chat's turns).
    pub fn run_one(&mut self, request: Request, sink: Box<dyn Sink>) -> Result<()> {
        if request.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        self.submit(request, sink);
        self.run_to_completion();
        Ok(())
    }

    /// left to do after an internal fault, so the engine can go on serving.
    pub fn abort_running(&mut self, message: &str) {
        for mut seq in self.running.drain(..) {
            seq.sink.send(Event::Error(message.to_owned()));
        }
        self.update_gauges();
    }

    /// Drops requests whose caller has gone, waiting or running: their
    /// blocks and queue places free at once.
    fn drop_closed(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.sink.is_closed());
        let mut gone = before - self.waiting.len();
        for s in &mut self.running {
            if s.sink.is_closed() && !s.finished {
                s.finished = true;
                gone += 1;
            }
        }
        if gone > 0 {
            self.metrics.cancelled.add(gone as u64);
            self.retire();
        }
    }

    /// Removes finished sequences (keeping the others' order), giving their
    /// caches to the prefix cache or freeing them.
    fn retire(&mut self) {
        if self.running.iter().any(|s| s.finished) {
            let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
                .into_iter()
                .partition(|s| s.finished);
            self.running = running;
            for seq in done {
                if self.limits.prefix_cache && !seq.cache.is_empty() {
                    self.prefix.insert(seq.cache, seq.blocks);
                }
                let _ = seq.id;
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let (running, cached) = self.kv_blocks_used();
        self.metrics.running.set(self.running.len() as u64);
        self.metrics.waiting.set(self.waiting.len() as u64);
        self.metrics
            .kv_blocks_total
            .set(self.budget.total_blocks as u64);
        self.metrics.kv_blocks_used.set((running + cached) as u64);
        self.metrics.kv_blocks_cached.set(cached as u64);
    }
}

/// Runs one request to completion on the calling thread, sending its events
/// to `sink`: the CLI's way in.
pub fn run_one(pipeline: Arc<Pipeline>, request: Request, sink: Box<dyn Sink>) -> Result<()> {
    let mut engine = Engine::new(
        pipeline,
        EngineLimits {
            max_batch: 1,
            ..EngineLimits::default()
        },
        Arc::new(Metrics::default()),
    );
    engine.run_one(request, sink)
}

#[cfg(test)]
mod tests;
