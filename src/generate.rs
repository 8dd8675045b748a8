//! The decode loop for one sequence: prompt in, streamed text out.
//!
//! Prefill reuses whatever prefix of the prompt is already in the
//! sequence's cache (the earlier turns of a chat), then each step samples a
//! token, streams the text it completes to a sink, and checks the stop
//! conditions: EOS ids, stop strings (matched across token boundaries and
//! never emitted), the token limit and cancellation.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::kv_cache::SeqKvCache;
use crate::models::{Decoder, Logits, SeqInput};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

/// When generation ends.
#[derive(Debug, Clone, Default)]
pub struct StopConditions {
    /// Token ids that end generation (not emitted).
    pub eos_ids: Vec<u32>,
    /// Strings that end generation (not emitted).
    pub stop_strings: Vec<String>,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Keep going past EOS ids (benchmarks, vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

/// Why generation ended, displayed as OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// The token limit.
    Length,
    /// The caller cancelled (Ctrl-C, a disconnected client).
    Cancelled,
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        })
    }
}

/// Counts and timings of one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest came from the cache).
    pub prefilled_tokens: usize,
    pub prefill_secs: f64,
    pub generated_tokens: usize,
    pub decode_secs: f64,
}

impl GenerationStats {
    /// Prompt tokens computed per second.
    pub fn prefill_tps(&self) -> f64 {
        rate(self.prefilled_tokens, self.prefill_secs)
    }

    /// Tokens generated per second after the first (which prefill yields).
    pub fn decode_tps(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// The outcome of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub stats: GenerationStats,
}

/// Generates a continuation of `prompt`, calling `on_text` with each piece
/// of text as it is produced. The cache keeps the prompt and the reply for
/// the next call.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Decoder,
    tokenizer: &Tokenizer,
    cache: &mut SeqKvCache,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop: &StopConditions,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() + stop.max_new_tokens > context {
        return Err(Error::InvalidRequest(format!(
            "the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {context} tokens",
            prompt.len(),
            stop.max_new_tokens
        )));
    }

    // Reuse the cached prefix, but always recompute at least the last
    // prompt token: its logits pick the first new token.
    let common = cache
        .tokens()
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len() - 1);
    cache.truncate(common);
    sampler.observe_prompt(prompt);

    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        prefilled_tokens: prompt.len() - common,
        ..Default::default()
    };
    let mut stream = StreamDecoder::new(tokenizer, true);
    let mut stops = StopStrings::new(&stop.stop_strings);
    let mut text = String::new();
    let mut tokens = Vec::new();

    let t0 = Instant::now();
    let mut logits = forward_last(model, &prompt[common..], cache)?;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let finish = loop {
        if cancel.load(Ordering::Relaxed) {
            break FinishReason::Cancelled;
        }
        if tokens.len() >= stop.max_new_tokens {
            break FinishReason::Length;
        }
        let next = sampler.sample(&logits)?;
        tokens.push(next);
        if !stop.ignore_eos && stop.eos_ids.contains(&next) {
            break FinishReason::Stop;
        }
        let piece = stream.push(next)?;
        if let Some(emit) = stops.feed(&piece) {
            text.push_str(&emit.text);
            if !emit.text.is_empty() {
                on_text(&emit.text)?;
            }
            if emit.stopped {
                break FinishReason::Stop;
            }
        }
        // The last token needs no forward pass: nothing will read its logits.
        if tokens.len() < stop.max_new_tokens {
            logits = forward_last(model, &[next], cache)?;
        }
    };
    if finish != FinishReason::Stop {
        let rest = stops.flush(&stream.finish()?);
        if !rest.is_empty() {
            on_text(&rest)?;
            text.push_str(&rest);
        }
    }
    stats.generated_tokens = tokens.len();
    stats.decode_secs = t1.elapsed().as_secs_f64();
    Ok(Generation {
        text,
        tokens,
        finish,
        stats,
    })
}

fn forward_last(model: &Decoder, tokens: &[u32], cache: &mut SeqKvCache) -> Result<Vec<f32>> {
    let mut batch = [SeqInput {
        tokens,
        cache,
        logits: Logits::Last,
    }];
    let out = model.forward(&mut batch)?;
    let row = out
        .into_iter()
        .next()
        .ok_or_else(|| Error::InvalidRequest("the model returned no logits".into()))?;
    Ok(row.flatten_all()?.to_vec1::<f32>()?)
}

/// What [`StopStrings::feed`] lets through.
#[derive(Debug, PartialEq, Eq)]
pub struct Emit {
    pub text: String,
    pub stopped: bool,
}

/// Finds stop strings in streamed text, holding back any tail that could
/// still become one so that no part of a stop string is ever emitted.
#[derive(Debug)]
pub struct StopStrings<'s> {
    stops: Vec<&'s str>,
    pending: String,
}

impl<'s> StopStrings<'s> {
    pub fn new(stops: &'s [String]) -> Self {
        StopStrings {
            stops: stops
                .iter()
                .map(String::as_str)
                .filter(|s| !s.is_empty())
                .collect(),
            pending: String::new(),
        }
    }

    /// Adds a piece; returns the text now safe to emit, and whether a stop
    /// string was reached (in which case the text ends right before it).
    pub fn feed(&mut self, piece: &str) -> Option<Emit> {
        if self.stops.is_empty() {
            return Some(Emit {
                text: piece.to_owned(),
                stopped: false,
            });
        }
        self.pending.push_str(piece);
        // The earliest stop string wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s)).min() {
            let text = self.pending[..at].to_owned();
            self.pending.clear();
            return Some(Emit {
                text,
                stopped: true,
            });
        }
        let hold = self.longest_partial_suffix();
        let cut = self.pending.len() - hold;
        if cut == 0 {
            return None;
        }
        let text: String = self.pending.drain(..cut).collect();
        Some(Emit {
            text,
            stopped: false,
        })
    }

    /// Emits whatever is held back (generation ended for another reason).
    pub fn flush(&mut self, last_piece: &str) -> String {
        self.pending.push_str(last_piece);
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of
    /// some stop string, on a character boundary.
    fn longest_partial_suffix(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let max = s.len().saturating_sub(1).min(p.len());
            for len in (best + 1..=max).rev() {
                let start = p.len() - len;
                if p.is_char_boundary(start) && s.starts_with(&p[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopStrings::new(&stops);
        let mut out = String::new();
        for p in pieces {
            if let Some(e) = m.feed(p) {
                out.push_str(&e.text);
                if e.stopped {
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush(""));
        (out, false)
    }

    #[test]
    fn stop_string_across_pieces_is_not_emitted() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn a_false_start_is_released() {
        assert_eq!(
            run(&["END"], &["hello E", "Nx", " done"]),
            ("hello ENx done".into(), false)
        );
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(
            run(&["world", "lo"], &["hello world"]),
            ("hel".into(), true)
        );
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        assert_eq!(
            run(&["日本"], &["こんにちは日", "本語"]),
            ("こんにちは".into(), true)
        );
    }
}
