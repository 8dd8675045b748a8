//! What a sequence does with its logits after a forward pass: prompt
//! logprobs while its prompt is computed; then, once its cache holds every
//! known token, *sample* (logits → token: the executor's side, which a GPU
//! sampler would take over) and *commit* (the token joins the sequence:
//! EOS, detokenizing, stop strings, the event to its sink).

use std::time::Instant;

use candle_core::Tensor;

use super::sequence::Sequence;
use super::{Event, Timing, TokenLogprob};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::sampling::{apply_mask, Sampler};
use crate::stopping::FinishReason;
use crate::tokenizer::Tokenizer;
use crate::Result;

/// A token picked for a sequence, not yet part of it.
pub(super) struct Sampled {
    pub(super) token: u32,
    /// Its logprob and alternatives, when the request asked for them.
    pub(super) logprob: Option<TokenLogprob>,
}

/// Handles one sequence's logits after a forward pass that computed `n` of
/// its tokens: prompt logprobs; then, once its prompt is all in the cache,
/// sampling and committing the token.
pub(super) fn advance(
    pipeline: &Pipeline,
    seq: &mut Sequence,
    n: usize,
    rows: &Tensor,
    metrics: &Metrics,
) -> Result<()> {
    let Some(last) = prompt_work(pipeline, seq, n, rows, metrics)? else {
        return Ok(());
    };
    if seq.generated >= seq.request.stop.max_new_tokens {
        return finish(seq, FinishReason::Length, &pipeline.tokenizer, metrics);
    }
    let sampled = sample(pipeline, seq, &last)?;
    commit(pipeline, seq, sampled, metrics)
}

/// Counts prompt work and gathers prompt logprobs. Returns the last row of
/// logits when the sequence is due to produce a token (its cache holds
/// every token it knows), `None` while its prompt is still being computed
/// or when its caller has gone.
fn prompt_work(
    pipeline: &Pipeline,
    seq: &mut Sequence,
    n: usize,
    rows: &Tensor,
    metrics: &Metrics,
) -> Result<Option<Vec<f32>>> {
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
                return Ok(None);
            }
        }
    }
    if !done {
        return Ok(None);
    }
    Ok(Some(rows.get(n_rows - 1)?.to_vec1::<f32>()?))
}

/// Logits → the next token (and its logprob when asked for), with the
/// sequence's sampler. Nothing about the sequence changes but its sampler's
/// state.
///
/// A constrained sequence samples among the tokens its grammar allows, and
/// its logprobs are those of the masked distribution. The mask is computed
/// every step: it costs tens of microseconds on a 150k vocabulary, where
/// sampling first without it and redrawing when the grammar refuses the
/// token (the sample-then-validate trick) costs a second sampling pass
/// (about 0.3 ms) on every refusal, and checking a token alone made
/// llguidance fail on grammars whose masks it computes (BENCHMARKS.md,
/// issue 13).
pub(super) fn sample(pipeline: &Pipeline, seq: &mut Sequence, logits: &[f32]) -> Result<Sampled> {
    let mask = match seq.constraint.as_mut() {
        Some(constraint) => Some(constraint.mask()?),
        None => None,
    };
    let token = seq.sampler.pick(logits, mask.as_deref())?;
    seq.sampler.record(token);
    let logprob = match (seq.request.logprobs, mask) {
        (Some(k), Some(mask)) => {
            let mut masked = logits.to_vec();
            apply_mask(&mut masked, &mask);
            Some(token_logprob(pipeline, &masked, token, k)?)
        }
        (Some(k), None) => Some(token_logprob(pipeline, logits, token, k)?),
        (None, _) => None,
    };
    Ok(Sampled { token, logprob })
}

/// The sampled token joins the sequence: counts, EOS, streamed text, stop
/// strings and the length limit.
pub(super) fn commit(
    pipeline: &Pipeline,
    seq: &mut Sequence,
    sampled: Sampled,
    metrics: &Metrics,
) -> Result<()> {
    let tokenizer = &pipeline.tokenizer;
    let Sampled { token, logprob } = sampled;
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
    let stop = &seq.request.stop;
    if !stop.ignore_eos && stop.eos_ids.contains(&token) {
        return finish(seq, FinishReason::Stop, tokenizer, metrics);
    }
    if let Some(constraint) = seq.constraint.as_mut() {
        constraint.commit(token)?;
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
    // A complete grammar that allows nothing more (a choice made, a JSON
    // value closed at the top level) ends the sequence as EOS would.
    let complete = seq.constraint.as_ref().is_some_and(|c| c.is_finished());
    if stopped || complete {
        return finish(seq, FinishReason::Stop, tokenizer, metrics);
    }
    if seq.generated >= seq.request.stop.max_new_tokens {
        return finish(seq, FinishReason::Length, tokenizer, metrics);
    }
    Ok(())
}

/// Flushes held-back text and sends `Done`.
pub(super) fn finish(
    seq: &mut Sequence,
    reason: FinishReason,
    tokenizer: &Tokenizer,
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
