//! The one decode loop. Every caller — the CLI, the server, the benchmark —
//! hands the engine [`Request`]s with a [`Sink`] for their events; each
//! [`Engine::step`] runs one forward pass over every running sequence
//! (prefill for new ones, one decode token for the others) and sends each
//! sequence's new text to its sink.
//!
//! The engine owns the sequences and their KV caches. A finished sequence's
//! cache goes to a small pool; a new request whose prompt starts with the
//! same tokens (a chat's earlier turns, a shared system prompt) takes it and
//! computes only the rest.
//!
//! [`handle`] runs an engine on its own thread behind a cloneable handle for
//! async callers.

pub mod handle;

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
    /// From admission to the first token.
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
}

impl<F: FnMut(Event) -> bool + Send> Sink for F {
    fn send(&mut self, event: Event) -> bool {
        self(event)
    }
}

/// Limits on what the engine holds at once.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Sequences in one forward pass.
    pub max_batch: usize,
    /// Finished sequences' caches kept for prefix reuse.
    pub prefix_pool: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            max_batch: 16,
            prefix_pool: 4,
        }
    }
}

struct Sequence {
    id: u64,
    request: Request,
    sink: Box<dyn Sink>,
    cache: SeqKvCache,
    sampler: Sampler,
    /// Tokens to feed in the next forward pass.
    pending: Vec<u32>,
    generated: usize,
    decoder: StreamDecoder,
    stops: StopStrings,
    usage: Usage,
    admitted: Instant,
    first_token: Option<Instant>,
    /// Set when the sequence is done, for removal after the step.
    finished: bool,
}

/// The scheduler and decode loop, driven by [`Engine::step`].
pub struct Engine {
    pipeline: Arc<Pipeline>,
    limits: EngineLimits,
    waiting: VecDeque<(u64, Request, Box<dyn Sink>)>,
    running: Vec<Sequence>,
    /// Finished caches, most recent last.
    pool: Vec<SeqKvCache>,
    next_id: u64,
    metrics: Arc<Metrics>,
}

impl Engine {
    pub fn new(pipeline: Arc<Pipeline>, limits: EngineLimits, metrics: Arc<Metrics>) -> Self {
        Engine {
            pipeline,
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pool: Vec::new(),
            next_id: 0,
            metrics,
        }
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Queues a request; its events go to `sink`. Returns its id.
    pub fn submit(&mut self, request: Request, sink: Box<dyn Sink>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back((id, request, sink));
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

    /// Admits waiting requests, runs one forward pass over the batch and
    /// delivers each sequence's new token.
    pub fn step(&mut self) {
        self.admit();
        if self.running.is_empty() {
            return;
        }
        let pipeline = self.pipeline.clone();
        let result = {
            let mut inputs: Vec<SeqInput> = self
                .running
                .iter_mut()
                .map(|s| {
                    let logits =
                        if s.request.prompt_logprobs && s.generated == 0 && s.pending.len() > 1 {
                            Logits::All
                        } else {
                            Logits::Last
                        };
                    SeqInput {
                        tokens: &s.pending,
                        cache: &mut s.cache,
                        logits,
                    }
                })
                .collect();
            pipeline.model.forward(&mut inputs)
        };
        match result {
            Ok(logits) => {
                for (seq, rows) in self.running.iter_mut().zip(logits) {
                    if let Err(e) = advance(&pipeline, seq, &rows, &self.metrics) {
                        seq.sink.send(Event::Error(e.to_string()));
                        seq.finished = true;
                    }
                }
            }
            Err(e) => {
                // A failed pass fails its sequences, not the engine.
                let message = format!("{e}");
                for seq in &mut self.running {
                    seq.sink.send(Event::Error(message.clone()));
                    seq.finished = true;
                }
            }
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

    /// Moves waiting requests into the batch, reusing pooled caches.
    fn admit(&mut self) {
        while self.running.len() < self.limits.max_batch {
            let Some((id, request, sink)) = self.waiting.pop_front() else {
                break;
            };
            // Echoed prompt logprobs need the logits of every prompt token,
            // so such a request computes its whole prompt.
            let (cache, common) = if request.prompt_logprobs {
                (self.pipeline.model.new_cache(), 0)
            } else {
                self.take_cache(&request.prompt)
            };
            let mut sampler = Sampler::new(request.sampling.clone());
            sampler.observe_prompt(&request.prompt);
            self.metrics.prefix_cache_hit_tokens.add(common as u64);
            let usage = Usage {
                prompt_tokens: request.prompt.len(),
                completion_tokens: 0,
                cached_tokens: common,
            };
            self.running.push(Sequence {
                id,
                pending: request.prompt[common..].to_vec(),
                stops: StopStrings::new(&request.stop.stop_strings),
                decoder: StreamDecoder::new(true),
                sampler,
                cache,
                sink,
                request,
                generated: 0,
                usage,
                admitted: Instant::now(),
                first_token: None,
                finished: false,
            });
        }
        self.update_gauges();
    }

    /// The pooled cache sharing the longest prefix with `prompt` (truncated
    /// to it), or a fresh one. At least the last prompt token is always
    /// recomputed: its logits pick the first new token.
    fn take_cache(&mut self, prompt: &[u32]) -> (SeqKvCache, usize) {
        let limit = prompt.len().saturating_sub(1);
        let best = self
            .pool
            .iter()
            .enumerate()
            .map(|(i, c)| (i, common_prefix(c.tokens(), prompt).min(limit)))
            .max_by_key(|&(_, n)| n);
        match best {
            Some((i, n)) if n > 0 => {
                let mut cache = self.pool.remove(i);
                cache.truncate(n);
                (cache, n)
            }
            _ => (self.pipeline.model.new_cache(), 0),
        }
    }

    /// Removes finished sequences, pooling their caches.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished {
                let seq = self.running.swap_remove(i);
                if self.limits.prefix_pool > 0 && !seq.cache.is_empty() {
                    if self.pool.len() >= self.limits.prefix_pool {
                        self.pool.remove(0);
                    }
                    self.pool.push(seq.cache);
                }
                let _ = seq.id;
            } else {
                i += 1;
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.metrics.running.set(self.running.len() as u64);
        self.metrics.waiting.set(self.waiting.len() as u64);
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Handles one sequence's logits after a forward pass: prompt logprobs,
/// sampling, streaming, stop checks.
fn advance(
    pipeline: &Pipeline,
    seq: &mut Sequence,
    rows: &Tensor,
    metrics: &Metrics,
) -> Result<()> {
    let tokenizer = &pipeline.tokenizer;
    let n_rows = rows.dim(0)?;
    if seq.generated == 0 {
        metrics.prompt_tokens.add(seq.pending.len() as u64);
        if seq.request.prompt_logprobs {
            let k = seq.request.logprobs.unwrap_or(0);
            let prompt = &seq.request.prompt;
            // Row r predicts pending[r + 1]; tokens served from the cache
            // have no logits here and are reported as unknown.
            let cached = seq.usage.cached_tokens;
            let mut out: Vec<Option<TokenLogprob>> = vec![None; prompt.len()];
            if n_rows == seq.pending.len() {
                let all = rows.to_vec2::<f32>()?;
                for (r, row) in all.iter().enumerate().take(n_rows.saturating_sub(1)) {
                    let pos = cached + r + 1;
                    out[pos] = Some(token_logprob(pipeline, row, prompt[pos], k)?);
                }
            }
            if !seq.sink.send(Event::PromptLogprobs(out)) {
                seq.finished = true;
                metrics.cancelled.add(1);
                return Ok(());
            }
        }
    }
    let last = rows.get(n_rows - 1)?.to_vec1::<f32>()?;
    let stop = &seq.request.stop;
    if seq.generated >= stop.max_new_tokens {
        return finish(seq, FinishReason::Length, tokenizer, metrics);
    }
    let token = seq.sampler.sample(&last)?;
    let logprob = match seq.request.logprobs {
        Some(k) => Some(token_logprob(pipeline, &last, token, k)?),
        None => None,
    };
    seq.generated += 1;
    seq.usage.completion_tokens = seq.generated;
    metrics.generation_tokens.add(1);
    let now = Instant::now();
    match seq.first_token {
        None => {
            seq.first_token = Some(now);
            metrics
                .time_to_first_token
                .observe(now.duration_since(seq.admitted).as_secs_f64());
        }
        Some(_) => {}
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
    seq.pending.clear();
    seq.pending.push(token);
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
        prefill_secs: first.duration_since(seq.admitted).as_secs_f64(),
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
pub fn run_one(
    pipeline: Arc<Pipeline>,
    request: Request,
    sink: Box<dyn Sink>,
    pool: &mut Vec<SeqKvCache>,
) -> Result<()> {
    if request.prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    let mut engine = Engine::new(
        pipeline,
        EngineLimits {
            max_batch: 1,
            prefix_pool: 1,
        },
        Arc::new(Metrics::default()),
    );
    engine.pool = std::mem::take(pool);
    engine.submit(request, sink);
    engine.run_to_completion();
    *pool = std::mem::take(&mut engine.pool);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
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
            logprobs: None,
            prompt_logprobs: false,
        }
    }

    /// A sink collecting token ids and the final event.
    fn collector() -> (Box<dyn Sink>, Arc<Mutex<(Vec<u32>, Option<Usage>)>>) {
        let out = Arc::new(Mutex::new((Vec::new(), None)));
        let o = out.clone();
        let sink = move |e: Event| {
            let mut g = o.lock().expect("lock");
            match e {
                Event::Token { id, .. } if id != u32::MAX => g.0.push(id),
                Event::Done { usage, .. } => g.1 = Some(usage),
                _ => {}
            }
            true
        };
        (Box::new(sink), out)
    }

    fn prompts() -> Vec<Vec<u32>> {
        (0..5)
            .map(|i| (0..(3 + 4 * i)).map(|t| (t * 7 + i * 13) % 380).collect())
            .collect()
    }

    #[test]
    fn a_batch_gives_each_request_what_it_gets_alone() {
        let p = pipeline();
        let metrics = Arc::new(Metrics::default());
        let alone: Vec<Vec<u32>> = prompts()
            .into_iter()
            .map(|prompt| {
                let mut e = Engine::new(
                    p.clone(),
                    EngineLimits {
                        max_batch: 1,
                        prefix_pool: 0,
                    },
                    metrics.clone(),
                );
                let (sink, out) = collector();
                e.submit(greedy(prompt, 12), sink);
                e.run_to_completion();
                let tokens = out.lock().expect("lock").0.clone();
                tokens
            })
            .collect();
        let mut e = Engine::new(
            p.clone(),
            EngineLimits {
                max_batch: 8,
                prefix_pool: 0,
            },
            metrics,
        );
        let outs: Vec<_> = prompts()
            .into_iter()
            .map(|prompt| {
                let (sink, out) = collector();
                e.submit(greedy(prompt, 12), sink);
                out
            })
            .collect();
        e.step();
        assert_eq!(e.running(), 5, "all five run in one batch");
        e.run_to_completion();
        for (i, out) in outs.iter().enumerate() {
            assert_eq!(out.lock().expect("lock").0, alone[i], "request {i}");
        }
    }

    #[test]
    fn a_shared_prefix_is_reused_and_changes_nothing() {
        let p = pipeline();
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(p.clone(), EngineLimits::default(), metrics.clone());
        let base: Vec<u32> = (0..40).map(|t| (t * 11) % 380).collect();
        let (sink, _) = collector();
        e.submit(greedy(base.clone(), 4), sink);
        e.run_to_completion();
        let mut longer = base.clone();
        longer.extend([5, 6, 7]);
        let (sink, out) = collector();
        e.submit(greedy(longer.clone(), 8), sink);
        e.run_to_completion();
        let (with_cache, usage) = out.lock().expect("lock").clone();
        assert_eq!(usage.expect("done").cached_tokens, 40);
        assert_eq!(metrics.prefix_cache_hit_tokens.get(), 40);

        let mut fresh = Engine::new(
            p,
            EngineLimits {
                max_batch: 1,
                prefix_pool: 0,
            },
            metrics,
        );
        let (sink, out) = collector();
        fresh.submit(greedy(longer, 8), sink);
        fresh.run_to_completion();
        assert_eq!(out.lock().expect("lock").0, with_cache);
    }

    #[test]
    fn a_sink_that_stops_listening_cancels_its_request() {
        let p = pipeline();
        let metrics = Arc::new(Metrics::default());
        let mut e = Engine::new(p, EngineLimits::default(), metrics.clone());
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
    }
}
