//! Grammar-constrained decoding: JSON schemas, regular expressions, choice
//! lists and Lark grammars, compiled with [`llguidance`] into a per-sequence
//! matcher that says which tokens may come next.
//!
//! Three pieces, with three lifetimes:
//! - [`TokenTable`]: the model's vocabulary as bytes (from taper's own
//!   [`Tokenizer`], so a `tokenizer.json` and a GGUF's rebuilt vocabulary
//!   go the same way), padded to the logits' width, with llguidance's
//!   parser factory over it. Built once per model ([`crate::pipeline::Pipeline::token_table`]).
//! - [`ConstraintSpec`]: what a request asks for, as the wire gave it.
//! - [`Constraint`]: a spec compiled for one model, carried by an
//!   [`crate::engine::Request`]. Compiling costs milliseconds to seconds, so
//!   it happens during request validation, off the engine thread; the
//!   engine only asks the compiled matcher for masks and feeds it the
//!   tokens it keeps (`src/engine/output.rs`).
//!
//! Bounds: a spec's text is at most [`MAX_SPEC_BYTES`], and llguidance's
//! own limits (grammar size, lexer fuel at compile time and per mask) stop
//! a hostile schema from taking a validation thread or an engine step for
//! long; either is a [`ConstraintError`] that names the limit.

mod vocab;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::TokEnv;
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::Tokenizer;

/// The longest spec text (a schema serialized, a regex, a grammar, the
/// choices together) compiled; beyond it a request is refused before
/// llguidance sees it.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// Whitespace a JSON schema's output may hold between two tokens of JSON:
/// one space, or a newline and up to 20 spaces or tabs of indentation
/// (llama.cpp's rule). Compact and pretty-printed JSON both fit; what a
/// model could otherwise do, and small models do, is loop on whitespace
/// until `max_tokens`.
pub const JSON_WHITESPACE: &str = r"\x20|\x0A[\x20\x09]{0,20}";

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Text that parses as JSON and validates against this JSON schema.
    JsonSchema(Value),
    /// Any JSON object (`response_format: json_object`).
    JsonObject,
    /// Text the whole of which matches this regular expression (Rust
    /// `regex` syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this Lark grammar (llguidance's dialect: `start:` rule,
    /// `%json` embedded schemas, special tokens as `<|name|>`).
    Lark(String),
}

impl ConstraintSpec {
    /// A short name for logs and messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "JSON schema",
            ConstraintSpec::JsonObject => "JSON object",
            ConstraintSpec::Regex(_) => "regular expression",
            ConstraintSpec::Choice(_) => "choice list",
            ConstraintSpec::Lark(_) => "grammar",
        }
    }
}

/// Why a constraint cannot be built or followed. Messages are written for
/// the client that sent the spec (a 400's body).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConstraintError {
    /// The JSON schema uses something llguidance does not implement, or is
    /// not a schema (the message names the keyword).
    #[error("the JSON schema cannot be compiled: {0}")]
    Schema(String),
    /// The regular expression does not parse.
    #[error("the regular expression cannot be compiled: {0}")]
    Regex(String),
    /// The Lark grammar does not parse or does not make sense (the message
    /// carries the line).
    #[error("the grammar cannot be compiled: {0}")]
    Grammar(String),
    /// The choice list is empty or holds something that cannot be matched.
    #[error("the choice list cannot be compiled: {0}")]
    Choice(String),
    /// The spec is over one of the size or work limits.
    #[error("the {kind} is too large: {message}")]
    TooLarge { kind: &'static str, message: String },
    /// The model's vocabulary cannot be turned into a token table (an
    /// unusual tokenizer): constraints are unavailable for this model.
    #[error("constrained decoding is unavailable for this model: {0}")]
    Vocabulary(String),
    /// The matcher failed while generating (a mask over its per-step
    /// limits, a token it did not expect).
    #[error("the output constraint failed while generating: {0}")]
    Matcher(String),
}

/// The model's vocabulary for llguidance, built once per model.
pub struct TokenTable {
    factory: ParserFactory,
    /// Entries in a mask: the logits' width (or the tokenizer's size, if
    /// larger).
    width: usize,
    built_in: Duration,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenTable")
            .field("width", &self.width)
            .field("built_in", &self.built_in)
            .finish()
    }
}

impl TokenTable {
    /// Builds the table for a model whose logits have `logits_width`
    /// entries, ending generation on `eos_ids` once a grammar accepts.
    pub fn new(
        tokenizer: &Tokenizer,
        logits_width: usize,
        eos_ids: &[u32],
    ) -> Result<Self, ConstraintError> {
        let start = Instant::now();
        let env: TokEnv = Arc::new(vocab::Vocabulary::new(tokenizer, logits_width, eos_ids)?);
        let width = env.tok_trie().vocab_size();
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        // llguidance logs warnings to stderr by default; taper reports
        // through its own errors.
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // Masks are computed on the engine thread: keep a pathological
            // grammar's step well under a decode step's time (llguidance
            // measures about 14k fuel and 20k items a millisecond).
            step_lexer_fuel: 100_000,
            step_max_items: 30_000,
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(TokenTable {
            factory,
            width,
            built_in: start.elapsed(),
        })
    }

    /// Entries in a mask.
    pub fn width(&self) -> usize {
        self.width
    }

    /// How long building the table took.
    pub fn build_time(&self) -> Duration {
        self.built_in
    }

    /// Compiles `spec` into a fresh constraint. See [`compile`].
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        compile(self, spec)
    }
}

/// A compiled constraint in its current state: what one sequence may
/// generate next. Cloning is cheap next to compiling (the grammar is
/// shared), so the `n` choices of a request compile once.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    kind: &'static str,
    /// How long compiling took (for logs and the benchmark).
    compile_time: Duration,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("kind", &self.kind)
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// Compiles `spec` for the model `table` was built for. Errors name the
/// keyword, line or limit at fault.
pub fn compile(table: &TokenTable, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
    let start = Instant::now();
    let kind = spec.kind();
    let grammar = grammar_of(spec)?;
    let parser = table
        .factory
        .create_parser(grammar)
        .map_err(|e| classify(spec, &e.to_string()))?;
    let mut matcher = Matcher::new(Ok(parser));
    if let Some(e) = matcher.get_error() {
        return Err(classify(spec, &e));
    }
    // Some grammars compile but fail at their first mask (llguidance
    // refuses ambiguous lexemes there): found here, that is a 400, not a
    // failed generation. The mask also warms the matcher's caches.
    if let Err(e) = matcher.compute_mask() {
        return Err(classify(spec, &e.to_string()));
    }
    Ok(Constraint {
        matcher,
        kind,
        compile_time: start.elapsed(),
    })
}

impl Constraint {
    /// What the spec was (for logs).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// How long compiling took.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// The tokens allowed next, as bits (see [`crate::sampling::mask_allows`]):
    /// EOS is among them when the grammar accepts what was generated.
    pub fn mask(&mut self) -> Result<Vec<u32>, ConstraintError> {
        let mask = self.matcher.compute_mask().map_err(matcher_error)?;
        Ok(mask.as_slice().to_vec())
    }

    /// Whether `token` may come next, without computing a whole mask (the
    /// engine computes masks: llguidance's one-token check failed on some
    /// grammars whose masks it computes).
    pub fn allows(&mut self, token: u32) -> Result<bool, ConstraintError> {
        if self.matcher.is_stopped() {
            return Ok(false);
        }
        let n = self
            .matcher
            .validate_tokens(&[token])
            .map_err(matcher_error)?;
        Ok(n == 1)
    }

    /// Advances past a token the sequence keeps.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.matcher.consume_token(token).map_err(matcher_error)
    }

    /// Whether the grammar is complete and nothing more may follow (after
    /// EOS, or when the grammar cannot be extended): the sequence ends.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

fn matcher_error(e: anyhow::Error) -> ConstraintError {
    ConstraintError::Matcher(e.to_string())
}

/// The spec as llguidance's grammar, after taper's own checks (size, empty
/// choices, schema shape).
fn grammar_of(spec: &ConstraintSpec) -> Result<TopLevelGrammar, ConstraintError> {
    let too_large = |bytes: usize| ConstraintError::TooLarge {
        kind: spec.kind(),
        message: format!("{bytes} bytes, the limit is {MAX_SPEC_BYTES} bytes"),
    };
    Ok(match spec {
        ConstraintSpec::JsonSchema(schema) => {
            let bytes = serde_json::to_string(schema).map_or(usize::MAX, |s| s.len());
            if bytes > MAX_SPEC_BYTES {
                return Err(too_large(bytes));
            }
            TopLevelGrammar::from_json_schema(with_json_options(schema.clone())?)
        }
        ConstraintSpec::JsonObject => TopLevelGrammar::from_json_schema(with_json_options(
            serde_json::json!({"type": "object"}),
        )?),
        ConstraintSpec::Regex(re) => {
            if re.len() > MAX_SPEC_BYTES {
                return Err(too_large(re.len()));
            }
            // llguidance would turn a bad regex into a confusing Lark error;
            // regex-syntax says what is wrong and where.
            regex_syntax::Parser::new()
                .parse(re)
                .map_err(|e| ConstraintError::Regex(e.to_string()))?;
            TopLevelGrammar::from_regex(re)
        }
        ConstraintSpec::Choice(choices) => {
            if choices.is_empty() {
                return Err(ConstraintError::Choice(
                    "it must hold at least one string".into(),
                ));
            }
            let bytes: usize = choices.iter().map(String::len).sum();
            if bytes > MAX_SPEC_BYTES {
                return Err(too_large(bytes));
            }
            if choices.iter().any(String::is_empty) {
                return Err(ConstraintError::Choice(
                    "the choices must not be empty strings".into(),
                ));
            }
            // A Lark string literal is a JSON string, so each choice is
            // quoted exactly.
            let alternatives: Vec<String> = choices
                .iter()
                .map(|c| serde_json::to_string(c).unwrap_or_default())
                .collect();
            TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
        }
        ConstraintSpec::Lark(text) => {
            if text.len() > MAX_SPEC_BYTES {
                return Err(too_large(text.len()));
            }
            if text.trim().is_empty() {
                return Err(ConstraintError::Grammar("the grammar is empty".into()));
            }
            TopLevelGrammar::from_lark(text.clone())
        }
    })
}

/// A schema with taper's JSON layout options (bounded whitespace) unless it
/// brings its own (`x-guidance`). `true` is the schema `{}`; `false` admits
/// nothing and cannot be generated.
fn with_json_options(schema: Value) -> Result<Value, ConstraintError> {
    let mut schema = match schema {
        Value::Bool(true) => serde_json::json!({}),
        Value::Object(_) => schema,
        Value::Bool(false) => {
            return Err(ConstraintError::Schema(
                "the schema `false` admits no value".into(),
            ))
        }
        other => {
            return Err(ConstraintError::Schema(format!(
                "a schema must be a JSON object (or true). Given: {}",
                json_type(&other)
            )))
        }
    };
    if let Value::Object(map) = &mut schema {
        if !map.contains_key("x-guidance") {
            let options = JsonCompileOptions {
                whitespace_pattern: Some(JSON_WHITESPACE.into()),
                ..JsonCompileOptions::default()
            };
            let options = serde_json::to_value(&options)
                .map_err(|e| ConstraintError::Schema(e.to_string()))?;
            map.insert("x-guidance".into(), options);
        }
    }
    Ok(schema)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Sorts llguidance's compile error into the variant the client should
/// read: a limit hit, else the spec's own kind.
fn classify(spec: &ConstraintSpec, message: &str) -> ConstraintError {
    let mut message = message.trim().to_string();
    if message.contains("schema too large") {
        // llguidance's own words leave out its limit.
        message = format!("{message} (more than 50000 schema nodes to compile)");
    }
    let over_limit = [
        "too big",
        "too large",
        "limit for this grammar",
        "fuel",
        "max is",
        "too many",
    ]
    .iter()
    .any(|m| message.contains(m));
    if over_limit {
        return ConstraintError::TooLarge {
            kind: spec.kind(),
            message,
        };
    }
    match spec {
        ConstraintSpec::JsonSchema(_) | ConstraintSpec::JsonObject => {
            ConstraintError::Schema(message)
        }
        ConstraintSpec::Regex(_) => ConstraintError::Regex(message),
        ConstraintSpec::Choice(_) => ConstraintError::Choice(message),
        ConstraintSpec::Lark(_) => ConstraintError::Grammar(at_line(&message)),
    }
}

/// llguidance starts a Lark error with `LINE(COLUMN): `; spelled out, so
/// the client knows what the numbers are.
fn at_line(message: &str) -> String {
    let position = message.split_once(": ").and_then(|(head, rest)| {
        let (line, column) = head.strip_suffix(')')?.split_once('(')?;
        let line: usize = line.parse().ok()?;
        let column: usize = column.parse().ok()?;
        Some(format!("line {line}, column {column}: {rest}"))
    });
    position.unwrap_or_else(|| message.to_string())
}

#[cfg(test)]
mod tests;
