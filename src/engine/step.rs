//! One engine step: plan it ([`Engine::schedule`]), build the batch of
//! every planned sequence's new tokens, run one forward pass over it, and
//! hand each sequence its logits ([`output::advance`]).

use candle_core::Tensor;

use super::{output, Engine, Event};
use crate::models::{Logits, SeqInput};
use crate::Result;

impl Engine {
    /// Plans the step (admission, chunks, blocks), runs one forward pass
    /// over the planned sequences and delivers each finished prompt's or
    /// decode's new token.
    pub fn step(&mut self) {
        self.drop_closed();
        let chunks = self.schedule();
        let result = self.forward(&chunks);
        let pipeline = self.pipeline.clone();
        let planned = self.running.iter_mut().zip(&chunks).filter(|(_, &n)| n > 0);
        match result {
            Some(Ok(logits)) => {
                for ((seq, &n), rows) in planned.zip(logits) {
                    if let Err(e) = output::advance(&pipeline, seq, n, &rows, &self.metrics) {
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

    /// One forward pass over the running sequences' planned chunks
    /// (`chunks[i]` new tokens for sequence `i`; 0: not in this pass), or
    /// `None` when nothing was planned. Each sequence asks for the logits
    /// it needs: every row while it owes prompt logprobs, the last when the
    /// chunk ends what it has to compute, else none.
    fn forward(&mut self, chunks: &[usize]) -> Option<Result<Vec<Tensor>>> {
        let pipeline = self.pipeline.clone();
        let mut inputs: Vec<SeqInput> = self
            .running
            .iter_mut()
            .zip(chunks)
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
    }
}
