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

pub mod blocks;
pub mod handle;
mod prefix_cache;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use crate::kv_cache::SeqKvCache;
use crate::metrics::Metrics;
use crate::models::{Logits, SeqInput};
use crate::pipeline::Pipeline;
use crate::sampling::{Sampler, SamplingParams};
use crate::stopping::{FinishReason, StopConditions, StopStrings};
use crate::tokenizer::StreamDecoder;
use crate::{Error, Result};

pub use handle::EngineHandle;
use prefix_cache::PrefixCache;

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

struct Sequence {
    id: u64,
    request: Request,
    sink: Box<dyn Sink>,
    /// The prompt and every token generated so far. The cache holds the
    /// first `cache.len()`; the rest are computed in the coming steps (a
    /// prompt in chunks, then one token a step; all of them again after a
    /// preemption).
    tokens: Vec<u32>,
    cache: SeqKvCache,
    /// KV blocks reserved for this sequence (its cache's buffers).
    blocks: usize,
    sampler: Sampler,
    generated: usize,
    decoder: StreamDecoder,
    stops: StopStrings,
    usage: Usage,
    /// Prompt logprobs gathered chunk by chunk, sent with the last chunk.
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    prompt_logprobs_sent: bool,
    submitted: Instant,
    first_token: Option<Instant>,
    /// Set when the sequence is done, for removal after the step.
    finished: bool,
}

impl Sequence {
    /// Tokens known but not yet in the cache.
    fn todo(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    /// Whether this sequence still owes its caller prompt logprobs, and so
    /// needs the logits of every prompt token.
    fn wants_prompt_logprobs(&self) -> bool {
        self.request.prompt_logprobs && !self.prompt_logprobs_sent
    }
}

/// What [`Engine::grow`] did to the sequence it was asked to grow.
enum Grow {
    /// It has a block for its next token.
    Grown,
    /// It was preempted: it left the running batch.
    Preempted,
    /// It cannot grow and nothing can be freed: it was finished.
    Finished,
}

/// What [`Engine::admit_head`] did with the queue's head.
enum Admit {
    /// Admitted, with this many tokens to compute.
    Admitted(usize),
    /// Refused with an error (it can never fit); try the next one.
    Refused,
    /// It waits for memory; so does everyone behind it.
    Wait,
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
    pub fn submit(&mut self, request: Request, sink: Box<dyn Sink>) -> u64 {
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

    /// Plans the step (admission, chunks, blocks), runs one forward pass
    /// over the planned sequences and delivers each finished prompt's or
    /// decode's new token.
    pub fn step(&mut self) {
        self.drop_closed();
        let chunks = self.schedule();
        let pipeline = self.pipeline.clone();
        let result = {
            let mut inputs: Vec<SeqInput> = self
                .running
                .iter_mut()
                .zip(&chunks)
                .filter(|(_, &n)| n > 0)
                .map(|(s, &n)| {
                    let start = s.cache.len();
                    let logits = if s.wants_prompt_logprobs() {
                        Logits::All
                    } else if start + n == s.tokens.len() {
                        Logits::Last
                    } else {
                        Logits::None
                    };
                    SeqInput {
                        tokens: &s.tokens[start..start + n],
                        cache: &mut s.cache,
                        logits,
                    }
                })
                .collect();
            if inputs.is_empty() {
                None
            } else {
                Some(pipeline.model.forward(&mut inputs))
            }
        };
        let planned = self.running.iter_mut().zip(&chunks).filter(|(_, &n)| n > 0);
        match result {
            Some(Ok(logits)) => {
                for ((seq, &n), rows) in planned.zip(logits) {
                    if let Err(e) = advance(&pipeline, seq, n, &rows, &self.metrics) {
                        seq.sink.send(Event::Error(e.to_string()));
                        seq.finished = true;
                    }
                }
            }
            Some(Err(e)) => {
                // A failed pass fails its sequences, not the engine.
                let message = format!("{e}");
                for (seq, _) in planned {
                    seq.sink.send(Event::Error(message.clone()));
                    seq.finished = true;
                }
            }
            None => {}
        }
        self.retire();
    }

    /// Fails every running sequence with `message` and drops it: what is
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

    /// Plans a step: how many tokens each running sequence computes (0:
    /// none this step), admitting waiting ones. Decodes first, then prompt
    /// chunks oldest first, within `max_batched_tokens`; reserves the
    /// blocks all of that needs.
    fn schedule(&mut self) -> Vec<usize> {
        let mut budget = self.limits.max_batched_tokens;
        let mut chunks = vec![0usize; self.running.len()];
        // Decodes (and prompts with one token left), oldest first: each may
        // need a new block, and may preempt younger sequences to get it.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished || self.running[i].todo() != 1 {
                i += 1;
                continue;
            }
            match self.grow(i) {
                Grow::Grown => {
                    chunks[i] = 1;
                    budget = budget.saturating_sub(1);
                    i += 1;
                }
                Grow::Finished => i += 1,
                Grow::Preempted => {}
            }
            chunks.truncate(self.running.len());
        }
        // Prompts part-way through: their blocks were reserved on admission.
        for (seq, chunk) in self.running.iter().zip(chunks.iter_mut()) {
            if budget == 0 {
                break;
            }
            if *chunk == 0 && !seq.finished && seq.todo() > 1 {
                *chunk = seq.todo().min(budget);
                budget -= *chunk;
            }
        }
        // New sequences, first come first served.
        while budget > 0 && self.running.len() < self.limits.max_batch {
            match self.admit_head() {
                Admit::Admitted(todo) => {
                    let n = todo.min(budget);
                    chunks.push(n);
                    budget -= n;
                }
                Admit::Refused => {}
                Admit::Wait => break,
            }
        }
        self.update_gauges();
        chunks
    }

    fn free_blocks(&self) -> usize {
        let (running, cached) = self.kv_blocks_used();
        self.budget.total_blocks.saturating_sub(running + cached)
    }

    /// Reserves the block running sequence `i` needs for its next token:
    /// from free blocks, else by evicting cached prefixes, else by
    /// preempting the youngest sequence (`i` itself when it is the
    /// youngest). A sequence alone that still cannot grow has used the whole
    /// budget: it ends with `length`.
    fn grow(&mut self, i: usize) -> Grow {
        let bs = self.budget.block_size;
        let seq = &self.running[i];
        let need = blocks::blocks_for(seq.cache.len() + 1, bs).saturating_sub(seq.blocks);
        loop {
            if need <= self.free_blocks() {
                let seq = &mut self.running[i];
                seq.blocks += need;
                seq.cache.reserve(seq.blocks * bs);
                return Grow::Grown;
            }
            if self.prefix.evict_lru(None).is_some() {
                continue;
            }
            let youngest = self.running.len() - 1;
            if youngest > i {
                self.preempt(youngest);
                continue;
            }
            if self.running.len() == 1 {
                let seq = &mut self.running[i];
                let result = finish(
                    seq,
                    FinishReason::Length,
                    &self.pipeline.tokenizer,
                    &self.metrics,
                );
                if let Err(e) = result {
                    seq.sink.send(Event::Error(e.to_string()));
                }
                seq.finished = true;
                return Grow::Finished;
            }
            self.preempt(i);
            return Grow::Preempted;
        }
    }

    /// Sends running sequence `i` back to the head of the queue, dropping
    /// its cache; it recomputes its prompt and what it generated when
    /// admitted again.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        seq.cache = self.pipeline.model.new_cache();
        seq.blocks = 0;
        self.metrics.preempted.add(1);
        self.waiting.push_front(seq);
    }

    /// Admits the queue's head if its blocks are free (evicting cached
    /// prefixes as needed, never preempting), leaving one free block per
    /// running sequence for their next decode step.
    fn admit_head(&mut self) -> Admit {
        let Some(seq) = self.waiting.front() else {
            return Admit::Wait;
        };
        let bs = self.budget.block_size;
        let need = blocks::blocks_for(seq.tokens.len(), bs);
        let refuse = if seq.tokens.is_empty() {
            Some("the prompt is empty".to_string())
        } else if need > self.budget.total_blocks {
            Some(format!(
                "the prompt needs {} positions of KV cache but the cache holds {} ({} MiB, --kv-cache-mem)",
                seq.tokens.len(),
                self.budget.positions(),
                self.budget.bytes() >> 20
            ))
        } else {
            None
        };
        if let Some(message) = refuse {
            if let Some(mut seq) = self.waiting.pop_front() {
                seq.sink.send(Event::Error(message));
            }
            return Admit::Refused;
        }
        // Echoed prompt logprobs need the logits of every prompt token, so
        // such a request computes its whole prompt.
        let mut hit = None;
        if self.limits.prefix_cache && !seq.wants_prompt_logprobs() {
            self.metrics.prefix_cache_queries.add(1);
            let tokens = &self.waiting[0].tokens;
            hit = self.prefix.lookup(tokens);
        }
        let headroom = self.running.len();
        while self.free_blocks() < need + headroom {
            if self.prefix.evict_lru(hit.map(|h| h.entry)).is_some() {
                continue;
            }
            if hit.take().is_none() {
                return Admit::Wait;
            }
        }
        let Some(mut seq) = self.waiting.pop_front() else {
            return Admit::Wait;
        };
        let capacity = need * bs;
        if let Some(h) = hit {
            match self.prefix.copy(h, capacity) {
                Ok(cache) => {
                    seq.cache = cache;
                    self.metrics.prefix_cache_hits.add(1);
                    self.metrics.prefix_cache_hit_tokens.add(h.tokens as u64);
                    if seq.generated == 0 {
                        seq.usage.cached_tokens = h.tokens;
                    }
                }
                Err(e) => {
                    seq.sink.send(Event::Error(e.to_string()));
                    return Admit::Refused;
                }
            }
        }
        seq.cache.reserve(capacity);
        seq.blocks = need;
        let todo = seq.todo();
        self.running.push(seq);
        Admit::Admitted(todo)
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

/// Handles one sequence's logits after a forward pass that computed `n` of
/// its tokens: prompt logprobs; then, once its prompt is all in the cache,
/// sampling, streaming, stop checks.
fn advance(
    pipeline: &Pipeline,
    seq: &mut Sequence,
    n: usize,
    rows: &Tensor,
    metrics: &Metrics,
) -> Result<()> {
    let tokenizer = &pipeline.tokenizer;
    let n_rows = rows.dim(0)?;
    // Before this pass the cache held `start` positions.
    let start = seq.cache.len() - n;
    let done = seq.cache.len() == seq.tokens.len();
    // Everything but a decode (one new token after the prompt) is prompt
    // work: a prompt's chunks, or a preempted sequence's recomputation.
    let decode = n == 1 && seq.generated > 0 && start + 1 == seq.tokens.len();
    if !decode {
        metrics.prompt_tokens.add(n as u64);
    }
    if seq.wants_prompt_logprobs() {
        let k = seq.request.logprobs.unwrap_or(0);
        let prompt = &seq.request.prompt;
        // Row r predicts token start + r + 1; tokens served from the cache
        // have no logits here and are reported as unknown.
        let out = seq
            .prompt_logprobs
            .get_or_insert_with(|| vec![None; prompt.len()]);
        if n_rows == n {
            let all = rows.to_vec2::<f32>()?;
            for (r, row) in all.iter().enumerate() {
                let pos = start + r + 1;
                if pos < prompt.len() {
                    out[pos] = Some(token_logprob(pipeline, row, prompt[pos], k)?);
                }
            }
        }
        if done {
            seq.prompt_logprobs_sent = true;
            let out = seq.prompt_logprobs.take().unwrap_or_default();
            if !seq.sink.send(Event::PromptLogprobs(out)) {
                seq.finished = true;
                metrics.cancelled.add(1);
                return Ok(());
            }
        }
    }
    if !done {
        return Ok(());
    }
    let stop = &seq.request.stop;
    if seq.generated >= stop.max_new_tokens {
        return finish(seq, FinishReason::Length, tokenizer, metrics);
    }
    let last = rows.get(n_rows - 1)?.to_vec1::<f32>()?;
    let token = seq.sampler.sample(&last)?;
    let logprob = match seq.request.logprobs {
        Some(k) => Some(token_logprob(pipeline, &last, token, k)?),
        None => None,
    };
    seq.generated += 1;
    seq.usage.completion_tokens = seq.generated;
    seq.tokens.push(token);
    metrics.generation_tokens.add(1);
    let now = Instant::now();
    if seq.first_token.is_none() {
        seq.first_token = Some(now);
        metrics
            .time_to_first_token
            .observe(now.duration_since(seq.submitted).as_secs_f64());
    }
    if !stop.ignore_eos && stop.eos_ids.contains(&token) {
        return finish(seq, FinishReason::Stop, tokenizer, metrics);
    }
    let piece = seq.decoder.push(tokenizer, token)?;
    let (text, stopped) = match seq.stops.feed(&piece) {
        Some(emit) => (emit.text, emit.stopped),
        None => (String::new(), false),
    };
    if !seq.sink.send(Event::Token {
        id: token,
        text,
        logprob,
    }) {
        seq.finished = true;
        metrics.cancelled.add(1);
        return Ok(());
    }
    if stopped {
        return finish(seq, FinishReason::Stop, tokenizer, metrics);
    }
    if seq.generated >= stop.max_new_tokens {
        return finish(seq, FinishReason::Length, tokenizer, metrics);
    }
    Ok(())
}

/// Flushes held-back text and sends `Done`.
fn finish(
    seq: &mut Sequence,
    reason: FinishReason,
    tokenizer: &crate::tokenizer::Tokenizer,
    metrics: &Metrics,
) -> Result<()> {
    seq.finished = true;
    if reason != FinishReason::Stop {
        let rest = seq.stops.flush(&seq.decoder.finish(tokenizer)?);
        if !rest.is_empty() {
            seq.sink.send(Event::Token {
                id: u32::MAX,
                text: rest,
                logprob: None,
            });
        }
    }
    let now = Instant::now();
    let first = seq.first_token.unwrap_or(now);
    let timing = Timing {
        prefill_secs: first.duration_since(seq.submitted).as_secs_f64(),
        decode_secs: now.duration_since(first).as_secs_f64(),
    };
    if seq.generated > 1 {
        metrics
            .inter_token_latency
            .observe(timing.decode_secs / (seq.generated - 1) as f64);
    }
    seq.sink.send(Event::Done {
        finish: reason,
        usage: seq.usage,
        timing,
    });
    Ok(())
}

/// The logprob of `token` under `logits` with the top `k` alternatives.
fn token_logprob(
    pipeline: &Pipeline,
    logits: &[f32],
    token: u32,
    k: usize,
) -> Result<TokenLogprob> {
    let (logprob, top) = Sampler::logprobs(logits, token, k);
    let text_of = |id: u32| pipeline.tokenizer.decode(&[id], false);
    Ok(TokenLogprob {
        id: token,
        text: text_of(token)?,
        logprob,
        top: top
            .into_iter()
            .map(|(id, lp)| Ok((id, text_of(id)?, lp)))
            .collect::<Result<Vec<_>>>()?,
    })
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
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use candle_core::{DType, Device};

    use super::*;
    use crate::hub::{resolve, HubOptions, ModelSource};

    fn pipeline() -> Arc<Pipeline> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
        let files =
            resolve(&ModelSource::Local(dir), &HubOptions::from_env()).expect("fixture resolves");
        Arc::new(
            Pipeline::load(
                &files,
                DType::F32,
                &Device::Cpu,
                crate::quant::Quant::None,
                None,
            )
            .expect("fixture loads"),
        )
    }

    fn greedy(prompt: Vec<u32>, n: usize) -> Request {
        Request {
            prompt,
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: StopConditions {
                max_new_tokens: n,
                ignore_eos: true,
                ..Default::default()
            },
            logprobs: Some(0),
            prompt_logprobs: false,
        }
    }

    /// What a request produced: token ids, their logprobs, the usage.
    #[derive(Debug, Default, Clone)]
    struct Output {
        tokens: Vec<u32>,
        logprobs: Vec<f32>,
        prompt_logprobs: Vec<Option<f32>>,
        usage: Option<Usage>,
        error: Option<String>,
    }

    /// A sink collecting what a request produced.
    fn collector() -> (Box<dyn Sink>, Arc<Mutex<Output>>) {
        let out = Arc::new(Mutex::new(Output::default()));
        let o = out.clone();
        let sink = move |e: Event| {
            let mut g = o.lock().expect("lock");
            match e {
                Event::Token { id, logprob, .. } if id != u32::MAX => {
                    g.tokens.push(id);
                    g.logprobs.extend(logprob.map(|l| l.logprob));
                }
                Event::PromptLogprobs(v) => {
                    g.prompt_logprobs = v.into_iter().map(|l| l.map(|l| l.logprob)).collect()
                }
                Event::Done { usage, .. } => g.usage = Some(usage),
                Event::Error(e) => g.error = Some(e),
                _ => {}
            }
            true
        };
        (Box::new(sink), out)
    }

    fn limits(max_batch: usize, max_batched_tokens: usize, prefix_cache: bool) -> EngineLimits {
        EngineLimits {
            max_batch,
            max_batched_tokens,
            prefix_cache,
            ..EngineLimits::default()
        }
    }

    /// Prompt `i` of lengths 3 to 198 tokens.
    fn prompt(i: usize) -> Vec<u32> {
        (0..(3 + 13 * i))
            .map(|t| ((t * 7 + i * 13) % 380) as u32)
            .collect()
    }

    /// Each request run by itself in a fresh engine, whole prompt at once.
    fn alone(p: &Arc<Pipeline>, requests: &[Request]) -> Vec<Output> {
        requests
            .iter()
            .map(|r| {
                let mut e = Engine::new(p.clone(), limits(1, 4096, false), Arc::default());
                let (sink, out) = collector();
                e.submit(r.clone(), sink);
                e.run_to_completion();
                let o = out.lock().expect("lock").clone();
                assert!(o.error.is_none(), "{:?}", o.error);
                o
            })
            .collect()
    }

    /// A seeded request that samples (temperature, top-p, top-k): the same
    /// seed must give the same tokens however the engine schedules it.
    fn seeded(prompt: Vec<u32>, n: usize, seed: u64) -> Request {
        let mut r = greedy(prompt, n);
        r.sampling = SamplingParams {
            temperature: 1.3,
            top_p: 0.9,
            top_k: Some(50),
            seed: Some(seed),
            ..Default::default()
        };
        r
    }

    /// Same tokens and bit-identical logprobs: a token's logits depend on
    /// its sequence alone, not on batching, chunking, the prefix cache or
    /// preemption (issue 11).
    fn assert_same(got: &Output, want: &Output, what: &str) {
        assert_eq!(got.error, None, "{what}");
        assert_eq!(got.tokens, want.tokens, "{what}: tokens");
        assert_eq!(got.logprobs.len(), want.logprobs.len(), "{what}");
        for (i, (a, b)) in got.logprobs.iter().zip(&want.logprobs).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{what}: logprob {i}: {a} vs {b}");
        }
    }

    #[test]
    fn sixteen_concurrent_requests_give_what_each_gives_alone() {
        let p = pipeline();
        // Every other request samples with its own seed.
        let requests: Vec<Request> = (0..16)
            .map(|i| match i % 2 {
                0 => greedy(prompt(i), 6 + i % 5),
                _ => seeded(prompt(i), 6 + i % 5, i as u64),
            })
            .collect();
        let want = alone(&p, &requests);
        // 64 tokens a step: the longer prompts are computed in chunks while
        // the others decode.
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(p.clone(), limits(16, 64, true), metrics.clone());
        let outs: Vec<_> = requests
            .iter()
            .map(|r| {
                let (sink, out) = collector();
                e.submit(r.clone(), sink);
                out
            })
            .collect();
        let mut steps = 0;
        while !e.is_idle() {
            e.step();
            steps += 1;
            assert!(
                e.running() <= 16 && metrics.kv_blocks_used.get() <= metrics.kv_blocks_total.get()
            );
        }
        for (i, out) in outs.iter().enumerate() {
            assert_same(
                &out.lock().expect("lock"),
                &want[i],
                &format!("request {i}"),
            );
        }
        let total: usize = requests.iter().map(|r| r.prompt.len()).sum();
        assert!(steps > total / 64, "prompts were chunked ({steps} steps)");
        assert_eq!(e.kv_blocks_used().0, 0, "finished sequences hold no blocks");
    }

    #[test]
    fn a_long_prompt_does_not_stall_running_decodes() {
        let p = pipeline();
        let mut e = Engine::new(p, limits(4, 32, false), Arc::default());
        let (sink, short) = collector();
        e.submit(greedy(vec![1, 2, 3], 20), sink);
        e.step();
        assert_eq!(short.lock().expect("lock").tokens.len(), 1);
        let (sink, long) = collector();
        e.submit(greedy(prompt(30), 2), sink);
        // 393 prompt tokens at 31 a step: the short request gets a token
        // every step meanwhile, the long one none until its last chunk.
        for step in 2..=10 {
            e.step();
            assert_eq!(short.lock().expect("lock").tokens.len(), step);
            assert!(long.lock().expect("lock").tokens.is_empty());
        }
        e.run_to_completion();
        assert_eq!(long.lock().expect("lock").tokens.len(), 2);
    }

    #[test]
    fn chunked_prefill_gives_the_logits_of_one_pass() -> Result<()> {
        let p = pipeline();
        let model = &p.model;
        let tokens = prompt(25);
        let mut cache = model.new_cache();
        let whole = model.forward(&mut [SeqInput {
            tokens: &tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])?;
        let whole = whole[0].to_vec2::<f32>()?;
        let mut cache = model.new_cache();
        let mut rows = Vec::new();
        for chunk in tokens.chunks(37) {
            let out = model.forward(&mut [SeqInput {
                tokens: chunk,
                cache: &mut cache,
                logits: Logits::All,
            }])?;
            rows.extend(out[0].to_vec2::<f32>()?);
        }
        assert_eq!(rows.len(), whole.len());
        for (a, b) in rows.iter().flatten().zip(whole.iter().flatten()) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
        }

        // The same through the engine: echoed prompt logprobs, in chunks of
        // 16 or all at once.
        let mut request = greedy(tokens, 3);
        request.prompt_logprobs = true;
        let want = &alone(&p, std::slice::from_ref(&request))[0];
        let mut e = Engine::new(p.clone(), limits(2, 16, true), Arc::default());
        let (sink, out) = collector();
        e.submit(request, sink);
        e.run_to_completion();
        let got = out.lock().expect("lock");
        assert_same(&got, want, "chunked");
        assert_eq!(got.prompt_logprobs.len(), want.prompt_logprobs.len());
        assert!(got.prompt_logprobs[0].is_none() && got.prompt_logprobs[1].is_some());
        for (a, b) in got
            .prompt_logprobs
            .iter()
            .zip(&want.prompt_logprobs)
            .skip(1)
        {
            let (a, b) = (a.expect("known"), b.expect("known"));
            assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn a_shared_prefix_is_reused_by_block_and_changes_nothing() {
        let p = pipeline();
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(p.clone(), limits(4, 512, true), metrics.clone());
        // A 100-token "system prompt", then two different questions.
        let system: Vec<u32> = (0..100).map(|t| (t * 11) % 380).collect();
        let ask = |q: &[u32]| {
            let mut v = system.clone();
            v.extend_from_slice(q);
            v
        };
        let (sink, _) = collector();
        e.submit(greedy(ask(&[5, 6, 7]), 4), sink);
        e.run_to_completion();
        assert_eq!(metrics.prefix_cache_hits.get(), 0);
        let (_, cached) = e.kv_blocks_used();
        assert_eq!(cached, 7, "103 + 3 positions kept: 7 blocks");

        let second = greedy(ask(&[9, 8, 7, 6]), 8);
        let (sink, out) = collector();
        e.submit(second.clone(), sink);
        e.run_to_completion();
        let with_cache = out.lock().expect("lock").clone();
        // The shared 100 tokens hold 6 whole blocks of 16.
        assert_eq!(with_cache.usage.expect("done").cached_tokens, 96);
        assert_eq!(metrics.prefix_cache_hit_tokens.get(), 96);
        assert_eq!(metrics.prefix_cache_queries.get(), 2);
        assert_eq!(metrics.prefix_cache_hits.get(), 1);
        assert_same(&with_cache, &alone(&p, &[second])[0], "from the cache");

        // Hits of 1, 2 and 5 blocks (a prompt that shares 16, 32 or 80
        // tokens with one served before), greedy and seeded, each against
        // the same request in a fresh engine.
        for blocks in [1usize, 2, 5] {
            let mut e = Engine::new(p.clone(), limits(4, 512, true), Arc::default());
            let shared = &system[..blocks * 16];
            let mut earlier = shared.to_vec();
            earlier.extend([300, 301, 302]);
            let (sink, _) = collector();
            e.submit(greedy(earlier, 2), sink);
            e.run_to_completion();
            let mut prompt = shared.to_vec();
            prompt.extend((0..(blocks * 7) as u32).map(|t| 200 + t));
            // The seeded request comes second and finds the greedy one's
            // whole prompt cached: a longer hit.
            let hits = [blocks * 16, (prompt.len() - 1) / 16 * 16];
            for (request, hit) in [greedy(prompt.clone(), 8), seeded(prompt.clone(), 8, 3)]
                .into_iter()
                .zip(hits)
            {
                let (sink, out) = collector();
                e.submit(request.clone(), sink);
                e.run_to_completion();
                let got = out.lock().expect("lock").clone();
                assert_eq!(got.usage.expect("done").cached_tokens, hit);
                assert_same(
                    &got,
                    &alone(&p, &[request])[0],
                    &format!("{blocks} cached blocks"),
                );
            }
        }
    }

    #[test]
    fn a_sink_that_stops_listening_cancels_its_request() {
        let p = pipeline();
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(p, limits(4, 512, false), metrics.clone());
        let mut seen = 0;
        let sink = move |e: Event| {
            if matches!(e, Event::Token { .. }) {
                seen += 1;
            }
            seen < 3
        };
        e.submit(greedy(vec![1, 2, 3], 100), Box::new(sink));
        let mut steps = 0;
        while !e.is_idle() {
            e.step();
            steps += 1;
        }
        assert_eq!(steps, 3, "cancelled after the third token");
        assert_eq!(metrics.cancelled.get(), 1);
        assert_eq!(metrics.running.get(), 0);
        assert_eq!(metrics.kv_blocks_used.get(), 0);
    }

    /// A sink whose caller can hang up without being sent anything.
    struct Closable(Arc<AtomicBool>);

    impl Sink for Closable {
        fn send(&mut self, _: Event) -> bool {
            !self.0.load(Ordering::SeqCst)
        }
        fn is_closed(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn a_request_cancelled_mid_prompt_frees_its_blocks_at_once() {
        let p = pipeline();
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(p, limits(4, 16, false), metrics.clone());
        let closed = Arc::new(AtomicBool::new(false));
        e.submit(greedy(prompt(20), 10), Box::new(Closable(closed.clone())));
        e.step();
        e.step();
        // 263 prompt tokens reserved: 17 blocks, 32 positions computed.
        assert_eq!(e.kv_blocks_used(), (17, 0));
        assert_eq!(metrics.kv_blocks_used.get(), 17);
        closed.store(true, Ordering::SeqCst);
        e.step();
        assert!(e.is_idle());
        assert_eq!(e.kv_blocks_used(), (0, 0));
        assert_eq!(metrics.kv_blocks_used.get(), 0);
        assert_eq!(metrics.cancelled.get(), 1);
    }

    #[test]
    fn a_budget_too_small_for_everyone_waits_and_preempts_without_changing_outputs() {
        let p = pipeline();
        let requests: Vec<Request> = (0..8)
            .map(|i| match i % 2 {
                0 => greedy(prompt(i % 4 + 1), 40),
                _ => seeded(prompt(i % 4 + 1), 40, 100 + i as u64),
            })
            .collect();
        let want = alone(&p, &requests);
        // 12 blocks (192 positions); each request needs 4 to 6 alone (16 to
        // 55 prompt tokens, 40 new), so at most a few fit at once and
        // growing ones must push others out.
        let metrics = Arc::new(Metrics::default());
        let bytes = blocks::bytes_per_position(&p.model) * 16 * 12;
        let mut e = Engine::new(
            p.clone(),
            EngineLimits {
                kv_cache_bytes: Some(bytes),
                ..limits(8, 64, true)
            },
            metrics.clone(),
        );
        assert_eq!(e.kv_budget().total_blocks, 12);
        let outs: Vec<_> = requests
            .iter()
            .map(|r| {
                let (sink, out) = collector();
                e.submit(r.clone(), sink);
                out
            })
            .collect();
        let mut most_waiting = 0;
        while !e.is_idle() {
            e.step();
            most_waiting = most_waiting.max(e.waiting());
            assert!(metrics.kv_blocks_used.get() <= 12);
        }
        assert!(most_waiting > 0, "some requests waited for memory");
        assert!(metrics.preempted.get() > 0, "some sequences were preempted");
        for (i, out) in outs.iter().enumerate() {
            let got = out.lock().expect("lock");
            assert_same(&got, &want[i], &format!("request {i}"));
            assert_eq!(got.tokens.len(), 40, "nothing sent twice");
        }
    }

    #[test]
    fn a_prompt_larger_than_the_whole_budget_is_refused() {
        let p = pipeline();
        let bytes = blocks::bytes_per_position(&p.model) * 16 * 2;
        let mut e = Engine::new(
            p.clone(),
            EngineLimits {
                kv_cache_bytes: Some(bytes),
                ..EngineLimits::default()
            },
            Arc::default(),
        );
        let (sink, out) = collector();
        e.submit(greedy(prompt(5), 4), sink);
        let (sink, fits) = collector();
        e.submit(greedy(vec![1, 2, 3], 4), sink);
        e.run_to_completion();
        let error = out.lock().expect("lock").error.clone().expect("refused");
        assert!(error.contains("--kv-cache-mem"), "{error}");
        assert_eq!(fits.lock().expect("lock").tokens.len(), 4);
    }
}
