//! The engine's [`TokenLogprob`]s in OpenAI's two formats: chat's list of
//! `{token, logprob, bytes, top_logprobs}` and the legacy completions
//! format of parallel lists with character offsets.

use std::collections::BTreeMap;

use crate::engine::TokenLogprob;

use super::response::{ChatTokenLogprob, CompletionLogprobs, TopLogprob};

/// One chat `logprobs.content[]` entry.
pub fn chat_entry(lp: &TokenLogprob) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: lp.text.clone(),
        logprob: lp.logprob,
        bytes: lp.text.as_bytes().to_vec(),
        top_logprobs: lp
            .top
            .iter()
            .map(|(_, text, logprob)| TopLogprob {
                token: text.clone(),
                logprob: *logprob,
                bytes: text.as_bytes().to_vec(),
            })
            .collect(),
    }
}

/// The alternatives as completions report them: the top tokens and,
/// always, the chosen one (so up to `logprobs + 1` entries, as OpenAI).
fn top_map(lp: &TokenLogprob) -> BTreeMap<String, f32> {
    let mut map: BTreeMap<String, f32> = lp
        .top
        .iter()
        .map(|(_, text, logprob)| (text.clone(), *logprob))
        .collect();
    map.entry(lp.text.clone()).or_insert(lp.logprob);
    map
}

/// Builds completions logprobs token by token. `text_offset` counts the
/// characters of the tokens before, starting at the choice's text start.
#[derive(Debug, Default)]
pub struct CompletionLogprobsBuilder {
    out: CompletionLogprobs,
    offset: usize,
}

impl CompletionLogprobsBuilder {
    /// Echoed prompt tokens: `texts[i]` with `entries[i]` (unknown for the
    /// first token, which nothing predicts).
    pub fn push_prompt(&mut self, texts: &[String], entries: &[Option<TokenLogprob>]) {
        for (i, text) in texts.iter().enumerate() {
            let entry = entries.get(i).and_then(Option::as_ref);
            self.push(text, entry.map(|e| e.logprob), entry.map(top_map));
        }
    }

    /// A generated token.
    pub fn push_generated(&mut self, lp: &TokenLogprob) {
        self.push(&lp.text, Some(lp.logprob), Some(top_map(lp)));
    }

    fn push(&mut self, text: &str, logprob: Option<f32>, top: Option<BTreeMap<String, f32>>) {
        self.out.tokens.push(text.to_owned());
        self.out.token_logprobs.push(logprob);
        self.out.top_logprobs.push(top);
        self.out.text_offset.push(self.offset);
        self.offset += text.chars().count();
    }

    /// The entries pushed since the last call (offsets keep counting).
    pub fn take(&mut self) -> CompletionLogprobs {
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(text: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            id: 0,
            text: text.into(),
            logprob,
            top: top.iter().map(|(t, l)| (1, t.to_string(), *l)).collect(),
        }
    }

    #[test]
    fn offsets_count_characters_across_prompt_and_output() {
        let mut b = CompletionLogprobsBuilder::default();
        b.push_prompt(
            &["é".into(), "ab".into()],
            &[None, Some(lp("ab", -1.0, &[]))],
        );
        b.push_generated(&lp("c", -0.5, &[("d", -0.7)]));
        let out = b.take();
        assert_eq!(out.text_offset, vec![0, 1, 3]);
        assert_eq!(out.token_logprobs, vec![None, Some(-1.0), Some(-0.5)]);
        assert!(out.top_logprobs[0].is_none());
        let top = out.top_logprobs[2].as_ref().expect("top");
        assert_eq!(top.len(), 2, "the chosen token is always listed");
    }

    #[test]
    fn chat_entries_carry_utf8_bytes() {
        let e = chat_entry(&lp("é", -0.1, &[("x", -2.0)]));
        assert_eq!(e.bytes, vec![0xC3, 0xA9]);
        assert_eq!(e.top_logprobs[0].token, "x");
    }
}
