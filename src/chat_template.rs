//! Chat templates: a list of messages → the prompt string the model was trained on.
//!
//! Owns reading a model's Jinja chat template (from `tokenizer_config.json`, a
//! sibling `chat_template.jinja`, or a `--chat-template` file) and rendering it
//! with minijinja the way transformers' `apply_chat_template` renders it with
//! Jinja2 (`utils/chat_template_utils.py`: `_compile_jinja_template`,
//! `render_jinja_template`). Callers are the CLI chat, the server's chat
//! completions route and the benchmark; they pass the rendered string to the
//! tokenizer with `add_special_tokens = false`, because the template itself
//! writes BOS (transformers does the same).
//!
//! Parity is checked against transformers on five real templates by
//! `tests/chat_template.rs` with fixtures from `scripts/make_template_refs.py`.
//!
//! Templates come from the Hub and are untrusted: there is no loader (no
//! `include`/`import` of files), and every render runs on a fuel budget so an
//! endless loop fails with an error instead of hanging a server thread. Fuel
//! also pays for the data a render creates, so it bounds memory too: the
//! budget is sized for that ([`RENDER_FUEL`]), the output is capped
//! ([`MAX_OUTPUT_BYTES`]), our own serializers (`tojson`, printing a list,
//! `str.join`) charge for every item they walk, and the vendored minijinja
//! refuses sequence concatenations the fuel cannot pay for
//! (`vendor/README.md`). A hostile template fails its render with an error;
//! the process keeps its memory (issue 12).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Budget of one render, in minijinja fuel: one unit per instruction, and one
/// per 64 bytes of strings created (a list slot costs half a unit, an item
/// walked by a filter another half). Since everything a render allocates is
/// paid for, this is also its memory bound: at most 64 MiB of data (128 MiB
/// with `Vec`'s doubling), where 20M units let one `replace` chain peak at
/// 2.1 GiB. The five real templates of `tests/chat_template.rs` render
/// 1,000 messages of 4 kB (4 MB of prompt, beyond any context window)
/// within it, Qwen3's in about a quarter of it; the costliest, Llama 3.1's,
/// runs out at about 12 MB.
pub const RENDER_FUEL: u64 = 1_000_000;

/// The longest prompt a render may produce, and the longest value our own
/// serializers (`tojson`, printing a list, `str.join`) build: 16 MiB is
/// millions of tokens, beyond any context window.
pub const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// The named special tokens transformers passes to every template
/// (`SPECIAL_TOKENS_ATTRIBUTES` in `tokenization_utils_base.py`).
const SPECIAL_TOKEN_NAMES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Context keys the renderer sets itself; `RenderOptions::extra` may not
/// replace them (transformers raises a TypeError on the duplicate keyword).
const RESERVED_KEYS: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// The template transformers picks when the tokenizer has several and the
/// request carries tools.
const TOOL_USE_TEMPLATE: &str = "tool_use";

/// One chat message as templates see it.
///
/// Unknown fields are ignored on input (no `deny_unknown_fields`), so wire
/// types can grow without breaking this one. The optional fields are left
/// out of what the template sees when absent, so `message.tool_calls is
/// defined` is false on a plain turn, as in transformers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    /// An assistant turn's calls, as OpenAI's `tool_calls` (with each
    /// `function.arguments` parsed into JSON when it parses, as the
    /// templates that `tojson` it expect).
    #[serde(default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the function's name (some templates print it).
    #[serde(default)]
    pub name: Option<String>,
    /// An earlier assistant turn's thinking, sent back by the client
    /// (Qwen3's template prints it for the turns after the last query).
    #[serde(default)]
    pub reasoning_content: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }
}

/// The optional fields are left out when absent, so a template's
/// `is defined` tests see what transformers would pass.
impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("role", &self.role)?;
        map.serialize_entry("content", &self.content)?;
        if let Some(calls) = &self.tool_calls {
            map.serialize_entry("tool_calls", calls)?;
        }
        if let Some(id) = &self.tool_call_id {
            map.serialize_entry("tool_call_id", id)?;
        }
        if let Some(name) = &self.name {
            map.serialize_entry("name", name)?;
        }
        if let Some(reasoning) = &self.reasoning_content {
            map.serialize_entry("reasoning_content", reasoning)?;
        }
        map.end()
    }
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// What a render needs besides the messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions<'a> {
    /// Open an assistant turn at the end (for generation).
    pub add_generation_prompt: bool,
    /// Tool schemas (a JSON list); the template sees `none` when absent.
    pub tools: Option<&'a serde_json::Value>,
    /// RAG documents (a JSON list); the template sees `none` when absent.
    pub documents: Option<&'a serde_json::Value>,
    /// Extra context keys, a JSON object, e.g. `{"enable_thinking": false}`.
    /// They override special tokens of the same name, as in transformers.
    pub extra: Option<&'a serde_json::Value>,
}

/// A compiled chat template with the special tokens it is rendered with.
///
/// Cheap to share: rendering takes `&self`, and the type is `Send + Sync`.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Name of the template used unless tools select `tool_use`.
    default_name: String,
    /// Every template's source, for [`ChatTemplate::mentions`].
    sources: Vec<String>,
    has_tool_use: bool,
    /// `bos_token`, `eos_token`, ... as strings; absent when unset.
    special_tokens: BTreeMap<String, String>,
    /// Where the template came from, for error messages.
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("default_name", &self.default_name)
            .field("special_tokens", &self.special_tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// From tokenizer_config.json: `chat_template` as a string or a list of
    /// `{name, template}` (pick "default", or the first), plus the special
    /// tokens bos_token, eos_token, unk_token, pad_token, ... (as strings or as
    /// AddedToken objects `{"content": ...}`). `Ok(None)` when the config has
    /// no template.
    ///
    /// As in transformers' `from_pretrained`, a `chat_template.jinja` (and
    /// `chat_templates/<name>.jinja`) next to the config replaces the config's
    /// `chat_template`: newer Hub repos ship their template that way.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let config = read_json(path)?;
        let special_tokens = special_tokens(&config);
        let dir = path.parent().unwrap_or(Path::new("."));

        let (templates, origin) = match template_files(dir)? {
            Some(files) => {
                let origin = if files.len() == 1 {
                    files[0].1.display().to_string()
                } else {
                    format!("{} (chat_template*.jinja)", dir.display())
                };
                let mut templates = Vec::with_capacity(files.len());
                for (name, file) in files {
                    templates.push((name, read_text(&file)?));
                }
                (templates, origin)
            }
            None => {
                let templates = config_templates(path, &config)?;
                (templates, format!("{} (chat_template)", path.display()))
            }
        };
        if templates.is_empty() {
            return Ok(None);
        }
        Self::build(templates, special_tokens, origin).map(Some)
    }

    /// From a template file given with --chat-template, with the special tokens
    /// from tokenizer_config.json when available.
    pub fn from_file(path: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let source = read_text(path)?;
        let special_tokens = match tokenizer_config {
            Some(config) => special_tokens(&read_json(config)?),
            None => BTreeMap::new(),
        };
        Self::build(
            vec![("default".to_string(), source)],
            special_tokens,
            path.display().to_string(),
        )
    }

    /// From template source held in memory. `special_tokens` maps names such
    /// as `bos_token` to their text; `origin` names the source in errors.
    pub fn from_source(
        source: impl Into<String>,
        special_tokens: BTreeMap<String, String>,
        origin: impl Into<String>,
    ) -> Result<Self> {
        Self::build(
            vec![("default".to_string(), source.into())],
            special_tokens,
            origin.into(),
        )
    }

    /// Whether any of the templates contains `needle`: how a model's
    /// tool-call syntax and thinking tags are recognised (from what its
    /// template writes, never from its name).
    pub fn mentions(&self, needle: &str) -> bool {
        self.sources.iter().any(|s| s.contains(needle))
    }

    /// The special tokens passed to the template (`bos_token`, ...).
    pub fn special_tokens(&self) -> &BTreeMap<String, String> {
        &self.special_tokens
    }

    /// Renders a conversation to the prompt text.
    ///
    /// Templates disagree on a call's `function.arguments`: Llama 3.1's
    /// `tojson`s it and wants an object (what transformers documents and
    /// vLLM passes), DeepSeek's concatenates it and wants the string. The
    /// object goes first; a template that fails on it gets the strings.
    ///
    /// An assistant turn that only called tools has `content: ""`, as vLLM
    /// passes it (Qwen3's template tests `'</think>' in message.content`,
    /// which fails on `none`), except for templates that find such turns
    /// by `content is none` (DeepSeek's), which get `none`.
    pub fn render(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        // transformers rejects an empty conversation before rendering; most
        // templates would fail on `messages[0]` with a less helpful message.
        if messages.is_empty() {
            return Err(Error::InvalidRequest(
                "`messages` must contain at least one message".to_string(),
            ));
        }
        if !messages.iter().any(|m| m.tool_calls.is_some()) {
            return self.render_once(Value::from(Serde(messages)), opts);
        }
        let first = self.with_tool_turns(messages, false);
        match self.render_once(first, opts) {
            Err(e) => self
                .render_once(self.with_tool_turns(messages, true), opts)
                .map_err(|_| e),
            ok => ok,
        }
    }

    /// The messages as the template sees them when some carry calls.
    fn with_tool_turns(&self, messages: &[Message], string_arguments: bool) -> Value {
        let null_content = ["content is none", "content'] is none", "content\"] is none"]
            .iter()
            .any(|n| self.mentions(n));
        let list: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or(serde_json::Value::Null);
                if null_content && m.content.is_empty() && m.tool_calls.is_some() {
                    v["content"] = serde_json::Value::Null;
                }
                if string_arguments {
                    for call in v
                        .get_mut("tool_calls")
                        .and_then(|c| c.as_array_mut())
                        .into_iter()
                        .flatten()
                    {
                        if let Some(args) = call.pointer_mut("/function/arguments") {
                            if !args.is_string() {
                                *args = serde_json::Value::String(args.to_string());
                            }
                        }
                    }
                }
                v
            })
            .collect();
        Value::from(Serde(list))
    }

    fn render_once(&self, messages: Value, opts: &RenderOptions) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        if let Some(extra) = opts.extra {
            let Some(extra) = extra.as_object() else {
                return Err(Error::InvalidRequest(
                    "chat template arguments must be a JSON object".to_string(),
                ));
            };
            for (key, value) in extra {
                if RESERVED_KEYS.contains(&key.as_str()) {
                    return Err(Error::InvalidRequest(format!(
                        "chat template arguments may not set `{key}`: it is set from the request"
                    )));
                }
                ctx.insert(key.clone(), Value::from(Serde(value)));
            }
        }
        ctx.insert("messages".into(), messages);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        );
        // Absent tools/documents are `none`, not undefined: transformers passes
        // `tools=None`, and templates test both `tools is defined` and
        // `tools is not none`.
        ctx.insert("tools".into(), json_or_none(opts.tools));
        ctx.insert("documents".into(), json_or_none(opts.documents));

        let name = if opts.tools.is_some() && self.has_tool_use {
            TOOL_USE_TEMPLATE
        } else {
            self.default_name.as_str()
        };
        let template = self
            .env
            .get_template(name)
            .map_err(|e| template_error(&self.origin, e))?;
        let mut out = BoundedWriter::default();
        match template.render_captured_to(Value::from(ctx), &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| Error::ChatTemplateRender {
                origin: self.origin.clone(),
                line: None,
                message: "the output is not valid UTF-8".into(),
            }),
            Err(_) if out.overflowed => Err(Error::ChatTemplateRender {
                origin: self.origin.clone(),
                line: None,
                message: format!("the output is longer than {MAX_OUTPUT_BYTES} bytes"),
            }),
            Err(e) => Err(template_error(&self.origin, e)),
        }
    }

    fn build(
        templates: Vec<(String, String)>,
        special_tokens: BTreeMap<String, String>,
        origin: String,
    ) -> Result<Self> {
        let mut env = environment();
        let default_name = templates
            .iter()
            .find(|(name, _)| name == "default")
            .or(templates.first())
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| "default".to_string());
        let has_tool_use = templates.iter().any(|(name, _)| name == TOOL_USE_TEMPLATE);
        let sources = templates.iter().map(|(_, source)| source.clone()).collect();
        for (name, source) in templates {
            // Compiling here surfaces syntax errors when the model loads,
            // not at the first request.
            env.add_template_owned(name, source)
                .map_err(|e| template_error(&origin, e))?;
        }
        Ok(ChatTemplate {
            env,
            default_name,
            sources,
            has_tool_use,
            special_tokens,
            origin,
        })
    }
}

/// The render's output, refused past [`MAX_OUTPUT_BYTES`] (minijinja stops at
/// the first failed write).
#[derive(Default)]
struct BoundedWriter {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("the template's output is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---- the Jinja environment ---------------------------------------------------

/// An environment configured like transformers' `ImmutableSandboxedEnvironment`.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // trim_blocks + lstrip_blocks, keep_trailing_newline off: transformers'
    // settings. Infallible for the default delimiters, so fall back to the
    // default config rather than panic if that ever changes.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
    {
        env.set_syntax(syntax);
    }
    // Prompts are not HTML, whatever the template's name.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(python_methods);
    env.set_formatter(python_formatter);

    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

/// `raise_exception(msg)`: the template refuses the conversation (e.g. roles
/// that do not alternate). The message travels as the error's source so
/// [`template_error`] can tell it from engine errors.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(Raised(message)),
    )
}

#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// `strftime_now(fmt)`: local time, as templates put today's date in the
/// system prompt (Llama 3.1, Mistral).
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let now = chrono::Local::now();
    let mut out = String::new();
    // chrono reports an unknown `%` directive as a formatting error; writing
    // into a String turns it into an Err instead of a panic.
    write!(out, "{}", now.format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// Python string/dict/list methods templates call (`.strip()`, `.items()`,
/// ...): minijinja-contrib's pycompat covers most; the few it lacks that chat
/// templates on the Hub use are added here.
///
/// `list.append` and the like stay unsupported on purpose: transformers'
/// immutable sandbox refuses them too, so a template using them fails there.
fn python_methods(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    // pycompat's `str.join` charges for the separator only, so `"".join(x)`
    // over a lazy `[1] * 10**9` built a gigabyte for free; ours pays per item.
    if method == "join" && value.kind() == ValueKind::String {
        let (items,): (&Value,) = minijinja::value::from_args(args)?;
        return str_join(state, value.as_str().unwrap_or_default(), items);
    }
    // pycompat's `str.format` pads to any width it is given, before any
    // fuel is charged: `"{:>999999999}".format(1)` allocated a gigabyte.
    // Every width and precision is a literal number in the format string,
    // so their sum bounds the padding: pay for it first, as minijinja's
    // own `format` filter does.
    if method == "format" && value.kind() == ValueKind::String {
        let padding = format_padding(value.as_str().unwrap_or_default());
        if padding > MAX_OUTPUT_BYTES {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("str.format: widths of {padding} characters exceed {MAX_OUTPUT_BYTES}"),
            ));
        }
        state.consume_fuel((padding / 64) as u64)?;
    }
    match minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args) {
        Err(e) if e.kind() == ErrorKind::UnknownMethod => extra_methods(value, method, args),
        other => other,
    }
}

/// The sum of the numbers in a `str.format` string: at least every width
/// and precision it asks for (field indices add a little).
fn format_padding(format: &str) -> usize {
    format
        .split(|c: char| !c.is_ascii_digit())
        .filter(|run| !run.is_empty())
        .map(|run| run.parse::<usize>().unwrap_or(usize::MAX))
        .fold(0usize, usize::saturating_add)
}

/// Python's `sep.join(items)`, metered like our serializers.
fn str_join(
    state: &State,
    sep: &str,
    items: &Value,
) -> std::result::Result<Value, minijinja::Error> {
    let mut out = String::new();
    for (i, item) in items.try_iter()?.enumerate() {
        charge_item(state, &out)?;
        if i > 0 {
            out.push_str(sep);
        }
        match item.as_str() {
            Some(s) => out.push_str(s),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "str.join: sequence item {i}: expected str instance, {} found",
                        item.kind()
                    ),
                ))
            }
        }
    }
    charge_item(state, &out)?;
    Ok(Value::from(out))
}

/// Pays for one item our own code walks (a lazy sequence of 10^9 items costs
/// minijinja nothing until it is walked) and refuses a result that has
/// grown past [`MAX_OUTPUT_BYTES`]. One fuel unit an item, twice what
/// minijinja's filters charge, since our items are also formatted.
fn charge_item(state: &State, built: &str) -> std::result::Result<(), minijinja::Error> {
    state.consume_fuel(1)?;
    if built.len() > MAX_OUTPUT_BYTES {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("a value grew past {MAX_OUTPUT_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn extra_methods(
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    use minijinja::value::from_args;
    let unknown = || minijinja::Error::from(ErrorKind::UnknownMethod);
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().ok_or_else(unknown)?;
            match method {
                "removeprefix" => {
                    let (prefix,): (&str,) = from_args(args)?;
                    Ok(Value::from(s.strip_prefix(prefix).unwrap_or(s)))
                }
                "removesuffix" => {
                    let (suffix,): (&str,) = from_args(args)?;
                    Ok(Value::from(s.strip_suffix(suffix).unwrap_or(s)))
                }
                "rsplit" => {
                    let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
                    Ok(Value::from(rsplit(s, sep, maxsplit)?))
                }
                "isspace" => {
                    let () = from_args(args)?;
                    Ok(Value::from(
                        !s.is_empty() && s.chars().all(char::is_whitespace),
                    ))
                }
                _ => Err(unknown()),
            }
        }
        ValueKind::Seq => match method {
            "index" => {
                let (needle,): (&Value,) = from_args(args)?;
                for (position, item) in value.try_iter()?.enumerate() {
                    if &item == needle {
                        return Ok(Value::from(position));
                    }
                }
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{needle} is not in list"),
                ))
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

/// Python's `str.rsplit(sep=None, maxsplit=-1)`.
fn rsplit(
    s: &str,
    sep: Option<&str>,
    maxsplit: Option<i64>,
) -> std::result::Result<Vec<String>, minijinja::Error> {
    let limit = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
    let mut parts: Vec<String> = match sep {
        Some("") => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "rsplit: empty separator",
            ))
        }
        Some(sep) => match limit {
            Some(n) => s.rsplitn(n + 1, sep).map(str::to_string).collect(),
            None => s.rsplit(sep).map(str::to_string).collect(),
        },
        None => {
            // Whitespace runs separate; leading/trailing whitespace is
            // dropped, except what remains in front of the last allowed split.
            let mut parts = Vec::new();
            let mut rest = s.trim_end();
            loop {
                if limit.is_some_and(|n| parts.len() == n) {
                    if !rest.is_empty() {
                        parts.push(rest.to_string());
                    }
                    break;
                }
                match rest.rfind(char::is_whitespace) {
                    Some(i) => {
                        let ws_len = rest[i..].chars().next().map_or(1, char::len_utf8);
                        parts.push(rest[i + ws_len..].to_string());
                        rest = rest[..i].trim_end();
                    }
                    None => {
                        if !rest.is_empty() {
                            parts.push(rest.to_string());
                        }
                        break;
                    }
                }
            }
            parts
        }
    };
    parts.reverse();
    Ok(parts)
}

/// Prints values the way Jinja2 prints Python objects: `None`, `True`,
/// `False`, `1.0`, `['a', 1]`, `{'k': None}`; undefined prints nothing.
/// minijinja alone would print `none`, `true` and JSON-like lists.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::String | ValueKind::Undefined | ValueKind::Plain | ValueKind::Invalid => {
            minijinja::escape_formatter(out, state, value)
        }
        _ => {
            let mut s = String::new();
            py_repr(state, &mut s, value, 0)?;
            out.write_str(&s).map_err(minijinja::Error::from)
        }
    }
}

/// Nesting beyond this is refused by `py_repr` and `tojson`; JSON parsed by
/// serde_json cannot nest deeper than 128 anyway.
const MAX_DEPTH: usize = 256;

fn too_deep() -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("value nested deeper than {MAX_DEPTH} levels"),
    )
}

/// Python `repr()` of a value.
fn py_repr(
    state: &State,
    out: &mut String,
    value: &Value,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    charge_item(state, out)?;
    match value.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&py_number(value)),
        ValueKind::String => py_repr_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(state, out, &item, depth + 1)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(state, out, &key, depth + 1)?;
                out.push_str(": ");
                py_repr(state, out, &value.get_item(&key)?, depth + 1)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

/// Python's `repr(str)`: single quotes unless the string holds `'` and no `"`.
fn py_repr_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            // Python escapes what `str.isprintable()` rejects; control
            // characters and non-space separators are the common cases.
            c if c.is_control() || (c.is_whitespace() && c != ' ') => {
                let code = c as u32;
                let _ = if code < 0x100 {
                    write!(out, "\\x{code:02x}")
                } else if code < 0x10000 {
                    write!(out, "\\u{code:04x}")
                } else {
                    write!(out, "\\U{code:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// A number as Python prints it (`str`/`repr`/`json.dumps` agree for ints
/// and floats).
fn py_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) => py_float(f),
        Err(_) => value.to_string(),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional notation
/// for exponents in [-4, 16), scientific (`1e+16`, `1.5e-07`) otherwise, and
/// always a `.0` on integral values.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like Python's repr.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!(
                "{sign}{digits}{}.0",
                "0".repeat(point as usize - digits.len())
            )
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{exp_sign}{:02}", exp.abs())
    }
}

// ---- tojson --------------------------------------------------------------------

/// The `tojson` filter transformers installs in place of Jinja's:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, with no HTML escaping. Positional arguments follow that
/// signature; keywords are accepted for all four.
fn tojson(
    state: &State,
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii = match kwargs.get::<Option<Value>>("ensure_ascii")? {
        Some(v) => v.is_true(),
        None => ensure_ascii.is_some_and(|v| v.is_true()),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    // Python: an int indents by that many spaces (negative: none), a string
    // indents by itself, None stays on one line.
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "tojson: indent must be an integer or a string, not {}",
                            v.kind()
                        ),
                    )
                })?;
                Some(" ".repeat(n.clamp(0, 64) as usize))
            }
        },
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() => {
            // At most three: two are valid, a third says the list is too long.
            let parts: Vec<Value> = seps.try_iter()?.take(3).collect();
            match (
                parts.first().and_then(|v| v.as_str()),
                parts.get(1).and_then(|v| v.as_str()),
            ) {
                (Some(item), Some(key)) if parts.len() == 2 => (item.to_string(), key.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        // json.dumps drops the space after ',' when indenting.
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;

    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(state, &mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonOpts {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }
}

/// Python's JSON encoder over a minijinja value.
fn write_json(
    state: &State,
    out: &mut String,
    value: &Value,
    opts: &JsonOpts,
    level: usize,
) -> std::result::Result<(), minijinja::Error> {
    if level > MAX_DEPTH {
        return Err(too_deep());
    }
    charge_item(state, out)?;
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&json_number(value)),
        ValueKind::String => json_str(out, value.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            // Walked, not collected: the sequence may be a lazy one of
            // 10^9 items, and each item is paid for as it is written.
            let mut items = value.try_iter()?.peekable();
            if items.peek().is_none() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                opts.newline(out, level + 1);
                write_json(state, out, &item, opts, level + 1)?;
            }
            opts.newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                charge_item(state, out)?;
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                opts.newline(out, level + 1);
                json_str(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(state, out, item, opts, level + 1)?;
            }
            opts.newline(out, level);
            out.push('}');
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// Python's json coerces keys that are not strings: `1` → `"1"`,
/// `True` → `"true"`, `None` → `"null"`.
fn json_key(key: &Value) -> std::result::Result<String, minijinja::Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::Number => Ok(json_number(key)),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::None => Ok("null".to_string()),
        kind => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

fn json_number(value: &Value) -> String {
    if !value.is_integer() {
        if let Ok(f) = f64::try_from(value.clone()) {
            // json.dumps writes non-finite floats as JavaScript literals.
            if f.is_nan() {
                return "NaN".into();
            }
            if f.is_infinite() {
                return if f > 0.0 {
                    "Infinity".into()
                } else {
                    "-Infinity".into()
                };
            }
        }
    }
    py_number(value)
}

/// A JSON string literal as Python writes it.
fn json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---- loading -------------------------------------------------------------------

fn json_or_none(value: Option<&serde_json::Value>) -> Value {
    match value {
        Some(v) => Value::from(Serde(v)),
        None => Value::from(()),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read_text(path)?).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The config's `chat_template` as (name, source) pairs; empty when absent.
fn config_templates(path: &Path, config: &serde_json::Value) -> Result<Vec<(String, String)>> {
    let bad = |message: &str| Error::Json {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::String(s)) => Ok(vec![("default".to_string(), s.clone())]),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|entry| {
                let name = entry.get("name").and_then(|v| v.as_str());
                let template = entry.get("template").and_then(|v| v.as_str());
                match (name, template) {
                    (Some(name), Some(template)) => Ok((name.to_string(), template.to_string())),
                    _ => Err(bad(
                        "`chat_template` list entries must be objects with string `name` and `template`",
                    )),
                }
            })
            .collect(),
        Some(_) => Err(bad(
            "`chat_template` must be a string or a list of {\"name\", \"template\"} objects",
        )),
    }
}

/// `chat_template.jinja` (as "default") and `chat_templates/<name>.jinja` next
/// to the config, if any; `None` when there are none.
fn template_files(dir: &Path) -> Result<Option<Vec<(String, PathBuf)>>> {
    let mut files = Vec::new();
    let single = dir.join("chat_template.jinja");
    if single.is_file() {
        files.push(("default".to_string(), single));
    }
    let many = dir.join("chat_templates");
    if many.is_dir() {
        let entries = std::fs::read_dir(&many).map_err(|e| Error::io(&many, e))?;
        let mut named = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&many, e))?.path();
            if path.extension().is_some_and(|ext| ext == "jinja") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    named.push((stem.to_string(), path.clone()));
                }
            }
        }
        // read_dir order is arbitrary; sort so "the first" is stable.
        named.sort();
        files.extend(named);
    }
    Ok(if files.is_empty() { None } else { Some(files) })
}

/// The special tokens transformers passes to templates: the named ones that
/// are set, plus the names in `extra_special_tokens` when it is a map (v5
/// makes those attributes too, e.g. Gemma 3's `boi_token`).
fn special_tokens(config: &serde_json::Value) -> BTreeMap<String, String> {
    let mut tokens = BTreeMap::new();
    if let Some(extra) = config
        .get("extra_special_tokens")
        .and_then(|v| v.as_object())
    {
        for (name, token) in extra {
            if let Some(text) = token_text(token) {
                tokens.insert(name.clone(), text);
            }
        }
    }
    for name in SPECIAL_TOKEN_NAMES {
        if let Some(text) = config.get(name).and_then(token_text) {
            tokens.insert(name.to_string(), text);
        }
    }
    tokens
}

/// A token written as a string or as an AddedToken object `{"content": ...}`.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Turns a minijinja error into the crate's, naming the template problem.
fn template_error(origin: &str, err: minijinja::Error) -> Error {
    // raise_exception's message may be wrapped by a macro or include frame.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(Raised(message)) = e.downcast_ref::<Raised>() {
            return Error::ChatTemplateRaised {
                message: message.clone(),
            };
        }
        source = e.source();
    }

    // A tokenizer can carry several named templates; say which one failed.
    let origin = match err.name() {
        Some(name) if name != "default" => format!("{origin} ['{name}']"),
        _ => origin.to_string(),
    };
    let origin = origin.as_str();
    let detail = match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    };
    match err.kind() {
        // The variant already says "syntax error"; keep just the detail.
        ErrorKind::SyntaxError | ErrorKind::BadEscape | ErrorKind::InvalidDelimiter => {
            Error::ChatTemplateSyntax {
                origin: origin.to_string(),
                line: err.line(),
                message: err.detail().map_or(detail, str::to_string),
            }
        }
        ErrorKind::OutOfFuel => Error::ChatTemplateRender {
            origin: origin.to_string(),
            line: err.line(),
            message: format!(
                "the template ran out of its budget of {RENDER_FUEL} fuel units \
                 (an endless loop, or far more data than a prompt needs?)"
            ),
        },
        _ => Error::ChatTemplateRender {
            origin: origin.to_string(),
            line: err.line(),
            message: detail,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ])
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::from_source(source, tokens(), "test").expect("template compiles")
    }

    fn user(content: &str) -> Vec<Message> {
        vec![Message::new("user", content)]
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }

    #[test]
    fn renders_messages_and_special_tokens() -> Result<()> {
        let t = template(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}\
             {% if add_generation_prompt %}[assistant]{% endif %}",
        );
        let opts = RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        assert_eq!(t.render(&user("hi"), &opts)?, "<s>[user] hi\n[assistant]");
        Ok(())
    }

    /// The five real templates in the parity tests control whitespace with
    /// `{%-`/`-%}` only, so trim_blocks / lstrip_blocks / keep_trailing_newline
    /// are checked here; the expected string is Jinja2's under transformers'
    /// settings.
    #[test]
    fn whitespace_control_matches_jinja() -> Result<()> {
        let t = template(
            "<s>\n{% for m in messages %}\n    {% if m.role == 'user' %}\n    U: {{ m.content }}\n    {% endif %}\n  \
             {# comment #}\n{% endfor %}\n{%+ if true %}kept{% endif %}\ndone\n",
        );
        let messages = [Message::new("user", "a"), Message::new("assistant", "b")];
        assert_eq!(
            t.render(&messages, &RenderOptions::default())?,
            "<s>\n    U: a\nkeptdone"
        );
        Ok(())
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let t = template("{{ raise_exception('Conversation roles must alternate') }}");
        match t.render(&user("hi"), &RenderOptions::default()) {
            Err(Error::ChatTemplateRaised { message }) => {
                assert_eq!(message, "Conversation roles must alternate")
            }
            other => panic!("expected ChatTemplateRaised, got {other:?}"),
        }
    }

    #[test]
    fn raise_exception_inside_a_macro() {
        let t = template("{% macro check(m) %}{{ raise_exception('bad ' + m.role) }}{% endmacro %}{{ check(messages[0]) }}");
        match t.render(&user("hi"), &RenderOptions::default()) {
            Err(Error::ChatTemplateRaised { message }) => assert_eq!(message, "bad user"),
            other => panic!("expected ChatTemplateRaised, got {other:?}"),
        }
    }

    #[test]
    fn endless_loop_runs_out_of_fuel() {
        // range() is capped at 100000 items (as in Jinja's sandbox), so nest
        // two: 10^10 iterations would take hours without fuel.
        let t = template("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}");
        let start = std::time::Instant::now();
        match t.render(&user("hi"), &RenderOptions::default()) {
            Err(e @ Error::ChatTemplateRender { .. }) => {
                assert!(e.to_string().contains("fuel"), "{e}");
            }
            other => panic!("expected an out-of-fuel error, got {other:?}"),
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn output_beyond_the_cap_is_refused() {
        // 10^5 x 10^3 bytes: 100 MB of output, refused at 16 MiB.
        let t = template("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}");
        match t.render(&user("hi"), &RenderOptions::default()) {
            Err(Error::ChatTemplateRender { message, .. }) => {
                assert!(message.contains("longer than"), "{message}")
            }
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn format_widths_are_paid_for_before_padding() {
        assert_eq!(format_padding("{0:>10} {1:.3f}"), 14);
        assert_eq!(format_padding("{:>99999999999999999999999}"), usize::MAX);
        let t = template("{{ '{:>999999999}'.format(1) }}");
        match t.render(&user("hi"), &RenderOptions::default()) {
            Err(Error::ChatTemplateRender { message, .. }) => {
                assert!(message.contains("widths"), "{message}")
            }
            other => panic!("expected a render error, got {other:?}"),
        }
        let t = template("{{ '{:>5}|{}'.format('ab', 'c') }}");
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())
                .ok()
                .as_deref(),
            Some("   ab|c")
        );
    }

    #[test]
    fn str_join_joins_strings_and_names_a_wrong_item() {
        let t = template("{{ ', '.join(['a', 'b']) }}|{{ ''.join([]) }}");
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())
                .ok()
                .as_deref(),
            Some("a, b|")
        );
        let t = template("{{ ', '.join(['a', 1]) }}");
        match t.render(&user("hi"), &RenderOptions::default()) {
            Err(Error::ChatTemplateRender { message, .. }) => {
                assert!(message.contains("item 1"), "{message}")
            }
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn huge_range_fails_instead_of_hanging() {
        let t = template("{% for i in range(10**9) %}x{% endfor %}");
        match t.render(&user("hi"), &RenderOptions::default()) {
            Err(Error::ChatTemplateRender { message, .. }) => {
                assert!(message.contains("range"), "{message}")
            }
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn endless_recursion_fails() {
        let t = template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        assert!(matches!(
            t.render(&user("hi"), &RenderOptions::default()),
            Err(Error::ChatTemplateRender { .. })
        ));
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = ChatTemplate::from_source("line one\n{% if %}\n", tokens(), "my.jinja")
            .expect_err("syntax error");
        match &err {
            Error::ChatTemplateSyntax { origin, line, .. } => {
                assert_eq!(origin, "my.jinja");
                assert_eq!(*line, Some(2));
            }
            other => panic!("expected ChatTemplateSyntax, got {other:?}"),
        }
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn no_file_access() {
        let t = template("{% include '/etc/passwd' %}");
        assert!(t.render(&user("hi"), &RenderOptions::default()).is_err());
    }

    #[test]
    fn template_list_picks_default_then_first() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let config = serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": "<|begin|>", "lstrip": false},
            "eos_token": "<|end|>",
            "pad_token": null,
            "chat_template": [
                {"name": "rag", "template": "rag"},
                {"name": "default", "template": "default {{ bos_token }}{{ eos_token }}{{ pad_token }}"},
                {"name": "tool_use", "template": "tools {{ tools | length }}"},
            ]
        });
        let path = write(dir.path(), "tokenizer_config.json", &config.to_string());
        let t = ChatTemplate::from_tokenizer_config(&path)?.expect("has a template");
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())?,
            "default <|begin|><|end|>"
        );
        // Tools select the tool_use template, as in transformers' get_chat_template.
        let tools = serde_json::json!([{"name": "f"}]);
        let opts = RenderOptions {
            tools: Some(&tools),
            ..Default::default()
        };
        assert_eq!(t.render(&user("hi"), &opts)?, "tools 1");

        let config = serde_json::json!({
            "chat_template": [{"name": "first", "template": "1"}, {"name": "second", "template": "2"}]
        });
        let path = write(dir.path(), "tokenizer_config.json", &config.to_string());
        let t = ChatTemplate::from_tokenizer_config(&path)?.expect("has a template");
        assert_eq!(t.render(&user("hi"), &RenderOptions::default())?, "1");
        Ok(())
    }

    #[test]
    fn missing_template_is_none() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"bos_token": "<s>"}"#,
        );
        assert!(ChatTemplate::from_tokenizer_config(&path)?.is_none());
        let path = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": null}"#,
        );
        assert!(ChatTemplate::from_tokenizer_config(&path)?.is_none());
        Ok(())
    }

    #[test]
    fn sibling_jinja_file_overrides_config() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": "from config", "eos_token": "</s>"}"#,
        );
        write(
            dir.path(),
            "chat_template.jinja",
            "from file {{ eos_token }}\n",
        );
        let t = ChatTemplate::from_tokenizer_config(&path)?.expect("has a template");
        // The trailing newline goes: keep_trailing_newline is off.
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())?,
            "from file </s>"
        );
        Ok(())
    }

    #[test]
    fn bad_chat_template_field_is_a_config_error() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"chat_template": 3}"#,
        );
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&path),
            Err(Error::Json { .. })
        ));
        Ok(())
    }

    #[test]
    fn from_file_reads_special_tokens_from_config() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let template = write(
            dir.path(),
            "t.jinja",
            "{{ bos_token }}{{ messages[0].content }}",
        );
        let config = write(
            dir.path(),
            "tokenizer_config.json",
            r#"{"bos_token": "<BOS>"}"#,
        );
        let t = ChatTemplate::from_file(&template, Some(&config))?;
        assert_eq!(t.render(&user("x"), &RenderOptions::default())?, "<BOS>x");
        let t = ChatTemplate::from_file(&template, None)?;
        assert_eq!(t.render(&user("x"), &RenderOptions::default())?, "x");
        Ok(())
    }

    #[test]
    fn tools_render_with_tojson() -> Result<()> {
        let t = template(
            "{% if tools %}{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}{% endif %}\
             {{ tools[0] | tojson(indent=2) }}",
        );
        let tools = serde_json::json!([{
            "type": "function",
            "function": {"name": "get_weather", "description": "Wetter in Zürich <b>&",
                         "parameters": {"required": ["city"], "empty": {}, "list": [], "n": 1.0, "ok": true, "none": null}}
        }]);
        let opts = RenderOptions {
            tools: Some(&tools),
            ..Default::default()
        };
        // Expected strings are Python's json.dumps(x, ensure_ascii=False[, indent=2]):
        // keys in insertion order, as Python dicts keep them.
        let expected = concat!(
            r#"{"type": "function", "function": {"name": "get_weather", "description": "Wetter in Zürich <b>&", "parameters": {"required": ["city"], "empty": {}, "list": [], "n": 1.0, "ok": true, "none": null}}}"#,
            "\n",
            "{\n  \"type\": \"function\",\n  \"function\": {\n    \"name\": \"get_weather\",\n",
            "    \"description\": \"Wetter in Zürich <b>&\",\n    \"parameters\": {\n      \"required\": [\n        \"city\"\n      ],\n",
            "      \"empty\": {},\n      \"list\": [],\n      \"n\": 1.0,\n      \"ok\": true,\n      \"none\": null\n    }\n  }\n}",
        );
        assert_eq!(t.render(&user("hi"), &opts)?, expected);
        Ok(())
    }

    #[test]
    fn tojson_options() -> Result<()> {
        let t = template(
            "{{ {'b': 1, 'a': 'é\"\\n'} | tojson(sort_keys=true) }}|\
             {{ 'é😀' | tojson(ensure_ascii=true) }}|\
             {{ [1, 2] | tojson(separators=(',', ':')) }}|{{ none | tojson }}",
        );
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())?,
            r#"{"a": "é\"\n", "b": 1}|"\u00e9\ud83d\ude00"|[1,2]|null"#
        );
        Ok(())
    }

    #[test]
    fn tools_absent_is_none() -> Result<()> {
        let t = template("{{ tools is defined }} {{ tools is none }} {{ documents }}");
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())?,
            "True True None"
        );
        Ok(())
    }

    #[test]
    fn prints_like_python() -> Result<()> {
        let t = template("{{ none }} {{ true }} {{ 1.0 }} {{ 1e20 }} {{ [1, 'a', \"it's\"] }} {{ {'k': none} }} {{ undefined_name }}|");
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())?,
            r#"None True 1.0 1e+20 [1, 'a', "it's"] {'k': None} |"#
        );
        Ok(())
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (0.0, "0.0"),
            (1.5, "1.5"),
            (-2.0, "-2.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e-7, "1.2345e-07"),
            (123456.789, "123456.789"),
            (0.1 + 0.2, "0.30000000000000004"),
        ] {
            assert_eq!(py_float(f), s, "{f}");
        }
    }

    #[test]
    fn extra_keys_reach_the_template() -> Result<()> {
        let t = template("{% if enable_thinking is defined and enable_thinking is false %}no-think{% endif %}{{ bos_token }}");
        let extra = serde_json::json!({"enable_thinking": false, "bos_token": "<override>"});
        let opts = RenderOptions {
            extra: Some(&extra),
            ..Default::default()
        };
        assert_eq!(t.render(&user("hi"), &opts)?, "no-think<override>");

        let extra = serde_json::json!({"messages": []});
        let opts = RenderOptions {
            extra: Some(&extra),
            ..Default::default()
        };
        assert!(matches!(
            t.render(&user("hi"), &opts),
            Err(Error::InvalidRequest(_))
        ));
        Ok(())
    }

    #[test]
    fn python_methods() -> Result<()> {
        let t = template(
            "{{ '  a b  '.strip() }}|{{ 'x\\n'.rstrip('\\n') }}|{{ 'a</think>b'.split('</think>')[-1] }}|\
             {{ 'Hello'.startswith('He') }}|{{ 'a b  c'.rsplit(None, 1) }}|{{ 'a,b,c'.rsplit(',', 1) }}|\
             {{ 'prefix-x'.removeprefix('prefix-') }}|{% for k, v in {'k': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ {'k': 1}.get('z', 2) }}|\
             {{ ['a', 'b'].index('b') }}|{{ 'title case'.title() }}",
        );
        assert_eq!(
            t.render(&user("hi"), &RenderOptions::default())?,
            "a b|x|b|True|['a b', 'c']|['a,b', 'c']|x|k=1|2|1|Title Case"
        );
        Ok(())
    }

    #[test]
    fn list_append_is_refused_like_the_sandbox() {
        let t = template("{% set l = [] %}{{ l.append(1) }}");
        assert!(t.render(&user("hi"), &RenderOptions::default()).is_err());
    }

    #[test]
    fn strftime_now_formats_and_rejects_bad_formats() -> Result<()> {
        let t = template("{{ strftime_now('%Y') }}");
        let year = t.render(&user("hi"), &RenderOptions::default())?;
        assert_eq!(year.len(), 4, "{year}");
        let t = template("{{ strftime_now('%Q') }}");
        assert!(t.render(&user("hi"), &RenderOptions::default()).is_err());
        Ok(())
    }

    #[test]
    fn shareable_across_threads() {
        // The server renders from many request tasks at once.
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn empty_conversation_is_rejected() {
        let t = template("x");
        assert!(matches!(
            t.render(&[], &RenderOptions::default()),
            Err(Error::InvalidRequest(_))
        ));
    }
}
