//! The vocabulary as llguidance needs it: every token id's bytes, in a
//! token trie as wide as the logits.
//!
//! Token strings in `tokenizers` are not bytes: byte-level BPE (GPT-2,
//! Llama 3, Qwen) spells each byte as one printable character, SentencePiece
//! conversions spell a space as `▁` and a raw byte as `<0xAB>`. Which
//! convention a vocabulary uses is read from its decoder, the part that
//! turns token strings back into text, so the same code serves a
//! `tokenizer.json` and the tokenizer rebuilt from a GGUF's metadata
//! (`src/gguf/tokenizer.rs` gives it the same decoders). Special tokens are
//! marked as llguidance expects (a leading 0xFF byte), so grammars never
//! produce them as text but can name them.

use std::collections::HashMap;

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv, INVALID_TOKEN};
use serde_json::Value;

use super::ConstraintError;
use crate::tokenizer::Tokenizer;

/// How the vocabulary spells bytes in its token strings.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spelling {
    /// One character per byte (GPT-2's table).
    ByteLevel,
    /// Text as UTF-8 with `space` standing for ' ', and `<0xAB>` tokens
    /// for raw bytes (SentencePiece with byte fallback).
    Pieces { space: char },
}

/// The token trie and what llguidance asks of a tokenizer.
pub(super) struct Vocabulary {
    trie: TokTrie,
}

impl Vocabulary {
    pub(super) fn new(
        tokenizer: &Tokenizer,
        logits_width: usize,
        eos_ids: &[u32],
    ) -> Result<Self, ConstraintError> {
        let inner = tokenizer.inner();
        let spelling = spelling(inner)?;
        let size = inner.get_vocab_size(true).max(logits_width);
        let size32 = u32::try_from(size)
            .map_err(|_| ConstraintError::Vocabulary(format!("{size} tokens is too many")))?;
        let added = inner.get_added_tokens_decoder();
        let bytes_of_byte = byte_level_table();
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(size);
        for id in 0..size32 {
            // Added tokens go through the decoder like the model's own
            // (tokenizers' `decode` does so), except special ones, which
            // are marked and never spelled.
            let added_token = added.get(&id);
            let text = match added_token {
                Some(t) if t.special => {
                    words.push(special(&t.content));
                    continue;
                }
                Some(t) => Some(t.content.clone()),
                None => inner.id_to_token(id),
            };
            let Some(text) = text else {
                // An id the tokenizer does not know (the head is wider than
                // the vocabulary): a placeholder no grammar can produce.
                words.push(special(&format!("<[pad {id}]>")));
                continue;
            };
            let word = match spelling {
                // As the ByteLevel decoder does: a string outside the byte
                // alphabet (an added token such as "  ") stands for itself.
                Spelling::ByteLevel => text
                    .chars()
                    .map(|c| bytes_of_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| text.as_bytes().to_vec()),
                Spelling::Pieces { space } => match raw_byte(&text) {
                    Some(b) if added_token.is_none() => vec![b],
                    _ => text.replace(space, " ").into_bytes(),
                },
            };
            words.push(word);
        }
        let eos: Vec<TokenId> = eos_ids.iter().copied().filter(|&id| id < size32).collect();
        let info = TokRxInfo::new(size32, eos.first().copied().unwrap_or(INVALID_TOKEN));
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        Ok(Vocabulary { trie })
    }
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Bytes the grammar forces are tokenized by longest match in the
    /// trie. Not always the tokenizer's own split, but always a valid one,
    /// and the same for every vocabulary (a SentencePiece tokenizer's
    /// encoder would prepend a space to each piece).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// A special token's trie entry: 0xFF, then its text.
fn special(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 1);
    v.push(TokTrie::SPECIAL_TOKEN_MARKER);
    v.extend_from_slice(text.as_bytes());
    v
}

/// `<0xAB>` → 0xAB.
fn raw_byte(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte ↔ character table: printable Latin-1 bytes stand for
/// themselves, the other 68 take the characters from U+0100 on, in order.
fn byte_level_table() -> HashMap<char, u8> {
    let printable =
        |b: u8| matches!(b, b'!'..=b'~') || matches!(b, 0xA1..=0xAC) || matches!(b, 0xAE..=0xFF);
    let mut table = HashMap::with_capacity(256);
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        if printable(b) {
            table.insert(char::from(b), b);
        } else {
            if let Some(c) = char::from_u32(next) {
                table.insert(c, b);
            }
            next += 1;
        }
    }
    table
}

/// Reads the spelling from the decoder's JSON form (the same shape as
/// `tokenizer.json`'s `decoder`): a `ByteLevel` decoder anywhere means
/// byte-level; `ByteFallback` or `Metaspace` means SentencePiece pieces,
/// whose space character comes from a `Replace` of it by " " or from the
/// `Metaspace` replacement.
fn spelling(tokenizer: &tokenizers::Tokenizer) -> Result<Spelling, ConstraintError> {
    let decoder = match tokenizer.get_decoder() {
        Some(d) => serde_json::to_value(d).unwrap_or(Value::Null),
        None => Value::Null,
    };
    let mut found = Found::default();
    walk(&decoder, &mut found);
    if found.byte_level {
        Ok(Spelling::ByteLevel)
    } else if found.pieces {
        Ok(Spelling::Pieces {
            space: found.space.unwrap_or('\u{2581}'),
        })
    } else {
        Err(ConstraintError::Vocabulary(format!(
            "the tokenizer's decoder ({}) is neither byte-level BPE nor SentencePiece, so its tokens' bytes are unknown",
            decoder.get("type").and_then(Value::as_str).unwrap_or("none")
        )))
    }
}

#[derive(Default)]
struct Found {
    byte_level: bool,
    pieces: bool,
    space: Option<char>,
}

fn walk(decoder: &Value, found: &mut Found) {
    match decoder.get("type").and_then(Value::as_str) {
        Some("ByteLevel") => found.byte_level = true,
        Some("ByteFallback") => found.pieces = true,
        Some("Metaspace") => {
            found.pieces = true;
            let replacement = decoder.get("replacement").and_then(Value::as_str);
            found.space = found.space.or_else(|| single_char(replacement));
        }
        Some("Replace") if decoder.get("content").and_then(Value::as_str) == Some(" ") => {
            let pattern = decoder.pointer("/pattern/String").and_then(Value::as_str);
            found.space = found.space.or_else(|| single_char(pattern));
        }
        Some("Sequence") => {
            for d in decoder
                .get("decoders")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                walk(d, found);
            }
        }
        _ => {}
    }
}

fn single_char(s: Option<&str>) -> Option<char> {
    let mut chars = s?.chars();
    let c = chars.next()?;
    chars.next().is_none().then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_table_is_a_bijection() {
        let table = byte_level_table();
        assert_eq!(table.len(), 256);
        let mut bytes: Vec<u8> = table.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        // GPT-2's space and newline.
        assert_eq!(table.get(&'Ġ'), Some(&b' '));
        assert_eq!(table.get(&'Ċ'), Some(&b'\n'));
        assert_eq!(table.get(&'a'), Some(&b'a'));
    }

    #[test]
    fn raw_byte_tokens_parse() {
        assert_eq!(raw_byte("<0x0A>"), Some(b'\n'));
        assert_eq!(raw_byte("<0xff>"), Some(0xFF));
        assert_eq!(raw_byte("<0x0A"), None);
        assert_eq!(raw_byte("<0xZZ>"), None);
        assert_eq!(raw_byte("<0x123>"), None);
    }
}
