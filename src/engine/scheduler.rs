//! The scheduler: which sequences compute how many tokens in the next
//! forward pass, under the token budget (decodes first, then prompt chunks,
//! then admissions) and the KV budget in blocks (admission waits for room;
//! a decode that cannot grow evicts cached prefixes, then preempts the
//! youngest running sequence, which is recomputed later).

use super::{blocks, output, Engine, Event};
use crate::stopping::FinishReason;

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
impl Engine {
    /// Plans a step: how many tokens each running sequence computes (0:
    /// none this step), admitting waiting ones. Decodes first, then prompt
    /// chunks oldest first, within `max_batched_tokens`; reserves the
    /// blocks all of that needs.
    pub(super) fn schedule(&mut self) -> Vec<usize> {
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

    pub(super) fn free_blocks(&self) -> usize {
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
                let result = output::finish(
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
}
