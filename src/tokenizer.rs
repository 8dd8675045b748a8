//! Text ↔ token ids: the `tokenizers` crate driven by `tokenizer.json`, with
//! the special-token rules of `tokenizer_config.json`, and streaming
//! detokenization that never splits a UTF-8 character.
//!
//! Raw prompts are encoded with the tokenizer's post-processor (which adds
//! BOS where the model expects one); text rendered by a chat template is
//! encoded without it, as `transformers`' `apply_chat_template` does, since
//! templates write their own BOS.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// `add_bos_token: true` in tokenizer_config.json.
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .finish()
    }
}

/// A special token's text, given as a string or as an AddedToken object.
pub(crate) fn special_token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, and the special-token settings of
    /// `tokenizer_config.json` when there is one.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| Error::Json {
            path: tokenizer_json.to_owned(),
            message: format!("cannot load the tokenizer: {e}"),
        })?;
        let mut tok = Tokenizer {
            inner,
            path: tokenizer_json.to_owned(),
            bos_id: None,
            eos_id: None,
            add_bos: false,
        };
        if let Some(cfg_path) = tokenizer_config {
            let cfg = crate::config::read_json(cfg_path)?;
            let id_of = |key: &str| {
                cfg.get(key)
                    .and_then(special_token_text)
                    .and_then(|t| tok.inner.token_to_id(&t))
            };
            tok.bos_id = id_of("bos_token");
            tok.eos_id = id_of("eos_token");
            tok.add_bos = cfg
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false);
        }
        Ok(tok)
    }

    /// A tokenizer built in memory (from GGUF metadata); `origin` names its
    /// source in messages.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        origin: PathBuf,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
        add_bos: bool,
    ) -> Self {
        Tokenizer {
            inner,
            path: origin,
            bos_id,
            eos_id,
            add_bos,
        }
    }

    /// The `tokenizers` tokenizer itself (the constraint module reads its
    /// vocabulary).
    pub(crate) fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The EOS token named in tokenizer_config.json.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The BOS token named in tokenizer_config.json.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The id of a token given by its text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes raw text as a prompt: the post-processor's special tokens,
    /// plus BOS when tokenizer_config.json asks for it and the
    /// post-processor did not add it (older Llama conversions).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_inner(text, true)?;
        if self.add_bos {
            if let Some(bos) = self.bos_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Encodes text that already carries its special tokens (a rendered
    /// chat template).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_inner(text, false)
    }

    fn encode_inner(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| Error::InvalidRequest(format!("tokenizing the prompt failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping special tokens unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::InvalidRequest(format!("detokenizing failed: {e}")))
    }

    /// Whether `id` is a special (added, `special: true`) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }
}

/// Turns a stream of token ids into a stream of text pieces.
///
/// Decoding one token at a time breaks multi-byte characters split across
/// byte-fallback tokens and loses SentencePiece's leading spaces, so each
/// step decodes a short window of recent tokens and emits only what the
/// window added, holding text back while it ends in an incomplete character
/// (U+FFFD). The pieces concatenate to the decode of all tokens.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the context window whose text was already emitted.
    prefix_offset: usize,
    /// End of the tokens whose text was already emitted.
    read_offset: usize,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special,
        }
    }

    /// Adds a token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix, full) = self.window(tokenizer)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(full[prefix.len()..].to_owned())
        } else {
            Ok(String::new())
        }
    }

    /// Returns whatever text is still held back (an incomplete character at
    /// the end of generation is emitted as U+FFFD, as a full decode would).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, full) = self.window(tokenizer)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_owned())
    }

    /// The text of the already-emitted context, and of the context plus the
    /// tokens not yet emitted.
    fn window(&self, tokenizer: &Tokenizer) -> Result<(String, String)> {
        let prefix = tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        Ok((prefix, full))
    }

    /// Every token pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
        Tokenizer::from_files(
            &dir.join("tokenizer.json"),
            Some(&dir.join("tokenizer_config.json")),
        )
        .expect("fixture tokenizer loads")
    }

    #[test]
    fn streamed_pieces_concatenate_to_the_full_decode() -> Result<()> {
        let tok = fixture_tokenizer();
        for text in [
            "Hello, world! A plain sentence.",
            "日本語のテキストと中文字符",
            "emoji 🦀🚀 mixed with text 🎉 and ü é ß",
        ] {
            let ids = tok.encode_plain(text)?;
            let mut stream = StreamDecoder::new(false);
            let mut out = String::new();
            for &id in &ids {
                let piece = stream.push(&tok, id)?;
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "broken UTF-8 streamed for {text:?}: {piece:?}"
                );
                out.push_str(&piece);
            }
            out.push_str(&stream.finish(&tok)?);
            assert_eq!(out, tok.decode(&ids, false)?);
            assert_eq!(out, text);
        }
        Ok(())
    }

    #[test]
    fn special_tokens_are_found() {
        let tok = fixture_tokenizer();
        let im_end = tok.token_id("<|im_end|>").expect("fixture has <|im_end|>");
        assert_eq!(tok.eos_id(), Some(im_end));
        assert!(tok.is_special(im_end));
    }

    #[test]
    fn a_missing_tokenizer_file_is_named() {
        let Err(err) = Tokenizer::from_files(Path::new("/nonexistent/tokenizer.json"), None) else {
            panic!("a missing tokenizer.json must fail");
        };
        let err = err.to_string();
        assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    }
}
