//! A tokenizer from GGUF metadata, for files that come without
//! `tokenizer.json`.
//!
//! llama.cpp's converter writes a byte-level BPE tokenizer (`tokenizer.ggml.
//! model = "gpt2"`) as its vocabulary in id order (`tokens`), each token's
//! kind (`token_type`: control tokens are the special ones), its merges
//! (`"a b"` strings, by rank) and, in `pre`, a name for the pre-tokenizer
//! (the regex splitting text into words), detected from the original
//! tokenizer's behaviour. This module rebuilds the `tokenizers` pipeline
//! that `tokenizer.json` would have described: the regex each `pre` name
//! stands for is the one in the original models' `tokenizer.json` (llama.cpp
//! keeps hand-adapted copies in `llama-vocab.cpp`), so encoding gives the
//! same ids as the original tokenizer.
//!
//! SentencePiece vocabularies (`model = "llama"`: Llama 2, Mistral, Gemma,
//! Phi-3) come as pieces with scores; they are rebuilt the way
//! `transformers` converts a SentencePiece model to `tokenizer.json`.

use std::collections::BTreeMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::chat_template::ChatTemplate;
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// `token_type` values (gguf-py's `TokenType`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// SentencePiece's stand-in for a space.
const SPIECE: &str = "\u{2581}";

/// Qwen2's split regex, from its tokenizer.json.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's: Qwen2's, with numbers in groups of up to three digits.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names taper knows, for messages.
pub const SUPPORTED_PRE: &str =
    "gpt-2, qwen2, deepseek-r1-qwen, llama-bpe, llama3, llama-v3, smollm, starcoder";

/// The tokenizer metadata of a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama`
    /// (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer regex.
    pub pre: Option<String>,
    /// Every token's text, by id.
    pub tokens: Vec<String>,
    /// Every token's kind, by id (may be empty: all normal).
    pub token_types: Vec<i32>,
    /// BPE merges, `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// SentencePiece: every token's score, by id (higher merges first).
    pub scores: Vec<f32>,
    /// SentencePiece: whether a space is put before the text
    /// (`tokenizer.ggml.add_space_prefix`; absent: yes, as llama.cpp).
    pub add_space_prefix: Option<bool>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; absent: the tokenizer kind's
    /// default.
    pub add_bos: Option<bool>,
}

impl GgufVocab {
    /// Reads `tokenizer.ggml.*`.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let model = f
            .str("tokenizer.ggml.model")?
            .ok_or_else(|| {
                f.err(
                    "has no tokenizer (no 'tokenizer.ggml.model'): put the model's tokenizer.json next to it"
                        .into(),
                )
            })?
            .to_string();
        let strings = |key: &str| -> Result<Vec<String>> {
            Ok(f.strings(key)?
                .unwrap_or_default()
                .into_iter()
                .map(str::to_string)
                .collect())
        };
        let token_types = f
            .ints("tokenizer.ggml.token_type")?
            .unwrap_or_default()
            .into_iter()
            .map(|t| i32::try_from(t).unwrap_or(0))
            .collect();
        Ok(GgufVocab {
            model,
            pre: f.str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens: strings("tokenizer.ggml.tokens")?,
            token_types,
            merges: strings("tokenizer.ggml.merges")?,
            scores: f.floats("tokenizer.ggml.scores")?.unwrap_or_default(),
            add_space_prefix: f.bool("tokenizer.ggml.add_space_prefix")?,
            bos_id: f.token_id("tokenizer.ggml.bos_token_id")?,
            eos_id: f.token_id("tokenizer.ggml.eos_token_id")?,
            unk_id: f.token_id("tokenizer.ggml.unknown_token_id")?,
            add_bos: f.bool("tokenizer.ggml.add_bos_token")?,
        })
    }

    /// Builds the tokenizer; `origin` (the GGUF file) names it in messages.
    pub fn build(&self, origin: &Path) -> Result<Tokenizer> {
        let err = |message: String| Error::Config {
            path: origin.to_path_buf(),
            message,
        };
        if self.tokens.is_empty() {
            return Err(err("tokenizer.ggml.tokens is missing or empty".into()));
        }
        if !self.token_types.is_empty() && self.token_types.len() != self.tokens.len() {
            return Err(err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                self.token_types.len(),
                self.tokens.len()
            )));
        }
        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        if vocab.len() != self.tokens.len() {
            // llama.cpp keeps the last id of a repeated token too; the
            // others can still be decoded to nothing, not to a wrong text.
            tracing::warn!(
                "{}: tokenizer.ggml.tokens lists {} tokens more than once",
                origin.display(),
                self.tokens.len() - vocab.len()
            );
        }
        let (mut inner, add_bos) = match self.model.as_str() {
            "gpt2" => self.byte_level_bpe(vocab, &err)?,
            "llama" => self.sentencepiece(vocab, &err)?,
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.model '{other}' is not supported (supported: gpt2, byte-level \
                     BPE; llama, SentencePiece BPE)"
                )))
            }
        };

        // Control tokens are the special ones (skipped when decoding with
        // `skip_special`); user-defined ones are matched whole but are text.
        let added = |kind: i32, special: bool| -> Vec<AddedToken> {
            self.tokens
                .iter()
                .zip(&self.token_types)
                .filter(|(_, &t)| t == kind)
                .map(|(text, _)| AddedToken::from(text.clone(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(&added(CONTROL, true));
        inner.add_tokens(&added(USER_DEFINED, false));

        Ok(Tokenizer::from_parts(
            inner,
            origin.to_path_buf(),
            self.bos_id,
            self.eos_id,
            self.add_bos.unwrap_or(add_bos),
        ))
    }

    /// `tokenizer.ggml.model = "gpt2"`: byte-level BPE behind the
    /// pre-tokenizer `pre` names. Returns it and whether it adds BOS by
    /// default.
    fn byte_level_bpe(
        &self,
        vocab: Vocab,
        err: &dyn Fn(String) -> Error,
    ) -> Result<(tokenizers::Tokenizer, bool)> {
        let pre = self.pre.as_deref().unwrap_or("(missing)");
        // (what splits before byte-level BPE, NFC, ignore_merges, BOS by
        // default), as the original tokenizer.json files have them.
        let (split, nfc, ignore_merges, add_bos) = match pre {
            "gpt-2" => (Words::Gpt2, false, false, false),
            // StarCoder's and SmolLM's: every digit alone, then GPT-2's.
            "smollm" | "starcoder" => (Words::Digits, false, false, false),
            "qwen2" | "deepseek-r1-qwen" => (Words::Regex(QWEN2_REGEX), true, false, false),
            "llama-bpe" | "llama3" | "llama-v3" => {
                (Words::Regex(LLAMA3_REGEX), false, true, true)
            }
            other => {
                return Err(err(format!(
                    "tokenizer.ggml.pre '{other}' is not a pre-tokenizer taper knows \
                     (supported: {SUPPORTED_PRE}); put the model's tokenizer.json next to the GGUF file"
                )))
            }
        };

        let merges = self
            .merges
            .iter()
            .map(|m| split_merge(m).ok_or_else(|| err(format!("merge '{m}' is not two tokens"))))
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| err(format!("the BPE vocabulary does not build: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        if nfc {
            inner.with_normalizer(Some(NFC));
        }
        let pre_tokenizer: PreTokenizerWrapper = match split {
            Words::Gpt2 => ByteLevel::new(false, true, true).into(),
            Words::Digits => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            Words::Regex(regex) => {
                let split = Split::new(
                    SplitPattern::Regex(regex.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| err(format!("the pre-tokenizer regex does not compile: {e}")))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        Ok((inner, add_bos))
    }

    /// `tokenizer.ggml.model = "llama"`: a SentencePiece BPE model (Llama 2,
    /// Mistral, Gemma, Phi-3), rebuilt as `transformers` converts one
    /// (`LlamaConverter`, `GemmaConverter`): BPE over pieces with byte
    /// fallback, merges ranked by the merged piece's score, spaces as `▁`
    /// with one put before the text when `add_space_prefix` says so (and
    /// taken off again when decoding). Adds BOS by default, as llama.cpp.
    fn sentencepiece(
        &self,
        vocab: Vocab,
        err: &dyn Fn(String) -> Error,
    ) -> Result<(tokenizers::Tokenizer, bool)> {
        if self.scores.len() != self.tokens.len() {
            return Err(err(format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                self.scores.len(),
                self.tokens.len()
            )));
        }
        let merges = self.sentencepiece_merges(&vocab);
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(unk) = self.unk_id.and_then(|id| self.tokens.get(id as usize)) {
            bpe = bpe.unk_token(unk.clone());
        }
        let bpe = bpe
            .build()
            .map_err(|e| err(format!("the BPE vocabulary does not build: {e}")))?;

        let space = |e: tokenizers::Error| err(format!("the space normalizer: {e}"));
        let to_piece: NormalizerWrapper = Replace::new(" ", SPIECE).map_err(space)?.into();
        let to_space: DecoderWrapper = Replace::new(SPIECE, " ").map_err(space)?.into();
        let prefix = self.add_space_prefix.unwrap_or(true);
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let mut decoders = vec![to_space, ByteFallback::new().into(), Fuse::new().into()];
        if prefix {
            inner.with_normalizer(Some(NormalizerSequence::new(vec![
                Prepend::new(SPIECE.to_string()).into(),
                to_piece,
            ])));
            decoders.push(Strip::new(' ', 1, 0).into());
        } else {
            inner.with_normalizer(Some(to_piece));
        }
        inner.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok((inner, true))
    }

    /// What `transformers`' `SentencePieceExtractor` derives from a
    /// SentencePiece model: for every piece, each split into two pieces of
    /// the vocabulary (ordered by their ids), all ranked by the piece's
    /// score, highest first (a stable sort: ties keep id order).
    fn sentencepiece_merges(&self, vocab: &Vocab) -> Vec<(String, String)> {
        let mut merges: Vec<(f32, u32, u32)> = Vec::new();
        for (id, piece) in self.tokens.iter().enumerate() {
            // Control, unknown, byte and unused pieces are never merged into.
            if !matches!(
                self.token_types.get(id),
                None | Some(&NORMAL) | Some(&USER_DEFINED)
            ) {
                continue;
            }
            let mut local: Vec<(u32, u32)> = piece
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| {
                    let (l, r) = piece.split_at(at);
                    Some((*vocab.get(l)?, *vocab.get(r)?))
                })
                .collect();
            local.sort_unstable();
            merges.extend(local.into_iter().map(|(l, r)| (self.scores[id], l, r)));
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0));
        let text = |id: u32| self.tokens[id as usize].clone();
        merges
            .into_iter()
            .map(|(_, l, r)| (text(l), text(r)))
            .collect()
    }
}

/// What splits text into words before byte-level BPE.
enum Words {
    /// GPT-2's regex, built into the ByteLevel pre-tokenizer.
    Gpt2,
    /// Each digit on its own, then GPT-2's regex.
    Digits,
    /// A regex of its own, with the ByteLevel step's regex off.
    Regex(&'static str),
}

/// `"a b"` → `("a", "b")`, splitting at the first space after the first
/// character as llama.cpp does (byte-level tokens hold no spaces).
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first = merge.chars().next()?.len_utf8();
    let at = first + merge[first..].find(' ')?;
    let (left, right) = (&merge[..at], &merge[at + 1..]);
    (!right.is_empty()).then(|| (left.to_string(), right.to_string()))
}

/// The tokenizer a GGUF file carries.
pub fn tokenizer(f: &GgufFile) -> Result<Tokenizer> {
    GgufVocab::from_gguf(f)?.build(f.path())
}

/// `tokenizer.chat_template`, rendered with the file's BOS and EOS texts.
pub fn chat_template(f: &GgufFile) -> Result<Option<ChatTemplate>> {
    let Some(source) = f.str("tokenizer.chat_template")? else {
        return Ok(None);
    };
    let tokens = f.strings("tokenizer.ggml.tokens")?.unwrap_or_default();
    let text = |key: &str| -> Result<Option<String>> {
        Ok(f.token_id(key)?
            .and_then(|id| tokens.get(id as usize))
            .map(|t| t.to_string()))
    };
    let mut special = BTreeMap::new();
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = text(key)? {
            special.insert(name.to_string(), t);
        }
    }
    ChatTemplate::from_source(
        source,
        special,
        format!("{} (tokenizer.chat_template)", f.path().display()),
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_inner_space() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("a bc"), Some(("a".into(), "bc".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge("a "), None);
        assert_eq!(split_merge(""), None);
    }

    /// Every byte's character, plus "12" with its merge.
    fn tiny_vocab(pre: &str) -> GgufVocab {
        let mut tokens: Vec<String> = ByteLevel::alphabet()
            .into_iter()
            .map(String::from)
            .collect();
        tokens.sort();
        tokens.push("12".into());
        tokens.push("<|end|>".into());
        let mut token_types = vec![1; tokens.len()];
        token_types[tokens.len() - 1] = CONTROL;
        GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            tokens,
            token_types,
            merges: vec!["1 2".into()],
            eos_id: Some(257),
            ..Default::default()
        }
    }

    #[test]
    fn digits_split_for_smollm_but_not_for_gpt2() -> Result<()> {
        let gpt2 = tiny_vocab("gpt-2").build(Path::new("t.gguf"))?;
        let smollm = tiny_vocab("smollm").build(Path::new("t.gguf"))?;
        assert_eq!(gpt2.encode_plain("12")?, [256]);
        assert_eq!(smollm.encode_plain("12")?.len(), 2);
        for tok in [&gpt2, &smollm] {
            // Control tokens are matched whole and are special.
            let ids = tok.encode_plain("a<|end|>")?;
            assert_eq!(ids.last(), Some(&257));
            assert!(tok.is_special(257));
            assert_eq!(tok.decode(&ids, true)?, "a");
            assert_eq!(
                tok.decode(&tok.encode_plain("héllo 12 🦀")?, false)?,
                "héllo 12 🦀"
            );
        }
        Ok(())
    }

    #[test]
    fn unknown_models_and_pre_tokenizers_are_refused_by_name() {
        let vocab = GgufVocab {
            model: "rwkv".into(),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        let err = vocab.build(Path::new("m.gguf")).unwrap_err().to_string();
        assert!(err.contains("m.gguf") && err.contains("'rwkv'"), "{err}");
        // SentencePiece needs a score per piece.
        let vocab = GgufVocab {
            model: "llama".into(),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        let err = vocab.build(Path::new("m.gguf")).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.scores"), "{err}");
        let vocab = GgufVocab {
            model: "gpt2".into(),
            pre: Some("falcon".into()),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        let err = vocab.build(Path::new("m.gguf")).unwrap_err().to_string();
        assert!(err.contains("'falcon'") && err.contains("qwen2"), "{err}");
    }
}
