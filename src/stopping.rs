//! When a generation stops and what it reports: stop conditions (EOS ids,
//! stop strings matched across token boundaries and never emitted, the token
//! limit), finish reasons and timing statistics. The decode loop itself is
//! the engine's ([`crate::engine`]).

use std::fmt;

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

/// What [`StopStrings::feed`] lets through.
#[derive(Debug, PartialEq, Eq)]
pub struct Emit {
    pub text: String,
    pub stopped: bool,
}

/// Finds stop strings in streamed text, holding back any tail that could
/// still become one so that no part of a stop string is ever emitted.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        StopStrings {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
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
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
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
