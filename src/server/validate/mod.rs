//! Validation: a wire request ([`super::request`]) becomes a
//! [`ValidRequest`] — prompts tokenized, every parameter checked and merged
//! with the server's defaults, one engine [`Request`] per choice — before
//! anything reaches the engine. Messages name the field and the limit:
//! "`temperature` must be in [0, 2]. Given: 3".
//!
//! Tokenizing and rendering templates is CPU work, so handlers run this on a
//! blocking thread.

mod params;
mod structured;
pub mod tools;

use crate::chat_template::{Message, RenderOptions};
use crate::constraint::{Constraint, ConstraintSpec};
use crate::engine::Request;
use crate::pipeline::Pipeline;
use crate::tools::grammar::{tool_grammar, ToolGrammar};
use crate::tools::parse::ParserConfig;
use crate::tools::{prompt_opens_thinking, ToolChoice};

use super::error::AppError;
use super::request::{ChatRequest, CompletionRequest, Content, Prompt, WireMessage};
use super::state::Ready;
use params::Common;

/// Choices one request may ask for (`n` times the number of prompts).
pub const MAX_CHOICES: usize = 128;
/// Alternatives per token for `top_logprobs` / `logprobs`.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;

/// One prompt, ready for the engine.
#[derive(Debug, Clone)]
pub struct ValidPrompt {
    pub ids: Vec<u32>,
    /// The prompt as text, for `echo`.
    pub text: String,
    /// Each token's own text, for echoed logprobs (empty otherwise).
    pub token_texts: Vec<String>,
}

/// A request the engine can run.
#[derive(Debug)]
pub struct ValidRequest {
    pub prompts: Vec<ValidPrompt>,
    /// One engine request per choice: all of the first prompt's `n`
    /// choices, then the second prompt's, and so on.
    pub requests: Vec<Request>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions: put the prompt before the generated text.
    pub echo: bool,
    /// Alternatives per token when logprobs were asked for.
    pub logprobs: Option<usize>,
    /// How to read each choice's output (chat: tool calls, thinking).
    pub parser: ParserConfig,
    /// Special tokens whose text the parser must see (`<|python_tag|>`):
    /// the engine's detokenizer leaves them out.
    pub special_markers: Vec<(u32, String)>,
    /// The grammar enforcing the request's `tool_choice`. When it holds
    /// from the first token (`required`, a named tool) it is compiled into
    /// every request's `constraint`; `auto`'s lazy one is not enforced yet.
    pub tool_grammar: Option<ToolGrammar>,
}

impl ValidRequest {
    /// The prompt a choice continues.
    pub fn prompt_of(&self, choice: usize) -> &ValidPrompt {
        &self.prompts[choice / self.n.max(1)]
    }

    /// Gives every choice its own copy of the compiled constraint (compiled
    /// once: copies share the grammar).
    fn constrained(mut self, constraint: Option<Constraint>) -> Self {
        if let Some(c) = constraint {
            for r in &mut self.requests {
                r.constraint = Some(c.clone());
            }
        }
        self
    }

    /// `usage.prompt_tokens`: each prompt counted once, whatever `n` is.
    pub fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(|p| p.ids.len()).sum()
    }
}

/// Checks a `/v1/chat/completions` request.
pub fn chat(req: ChatRequest, ready: &Ready, served: &str) -> Result<ValidRequest, AppError> {
    let ChatRequest {
        chat,
        mut sampling,
        structured,
    } = req;
    if let Some(m) = chat.max_completion_tokens {
        sampling.max_tokens = Some(m);
    }
    let common = Common::check(sampling, ready, served, false)?;
    let logprobs = match (chat.logprobs, chat.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) => {
            return Err(AppError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be in [0, {MAX_TOP_LOGPROBS}]. Given: {k}"),
            ))
        }
        (Some(true), k) => Some(k.unwrap_or(0) as usize),
        (_, Some(_)) => {
            return Err(AppError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs` to be true.",
            ))
        }
        _ => None,
    };
    if chat.messages.is_empty() {
        return Err(AppError::invalid(
            "messages",
            "`messages` must hold at least one message.",
        ));
    }
    if let Some(m) = chat
        .modalities
        .as_ref()
        .filter(|m| m.iter().any(|x| x != "text"))
    {
        return Err(AppError::invalid(
            "modalities",
            format!("`modalities`: taper generates text only (`[\"text\"]`). Given: {m:?}"),
        ));
    }
    let kwargs = check_template_kwargs(chat.chat_template_kwargs)?;
    let tools = tools::check(chat.tools, chat.tool_choice, chat.parallel_tool_calls)?;
    let messages = chat
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| to_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let pipeline = ready.pipeline();
    let syntax = &pipeline.output;
    let format = syntax.tool_format;
    let (messages, template_tools) =
        syntax.prepare(messages, &tools.tools, &tools.choice, tools.parallel);
    let opts = RenderOptions {
        add_generation_prompt: true,
        tools: template_tools.as_ref(),
        documents: None,
        extra: kwargs.as_ref(),
    };
    let text = pipeline
        .render_chat(&messages, &opts)
        .map_err(|e| AppError::from(e).or_param("messages"))?;
    let ids = pipeline
        .tokenizer
        .encode_plain(&text)
        .map_err(|e| AppError::from(e).or_param("messages"))?;
    if tools.active() {
        tracing::debug!("tool calls in the {format} format");
    }
    let parser = ParserConfig {
        tools: tools.active().then_some(format),
        reasoning: syntax.reasoning,
        starts_in_reasoning: syntax.reasoning && prompt_opens_thinking(&text),
        parallel: tools.parallel,
        stream_arguments: false,
    };
    let grammar = tool_grammar(
        format,
        syntax.call_tokens,
        &tools.tools,
        &tools.choice,
        tools.parallel,
    );
    let prompt = ValidPrompt {
        ids,
        text: String::new(),
        token_texts: Vec::new(),
    };
    let mut valid = common.build(vec![prompt], logprobs, false, "messages", ready)?;
    valid.parser = parser;
    valid.special_markers = syntax.special_markers.clone();
    valid.tool_grammar = grammar;
    // Compiled last: it is the costliest check.
    let mut constraint = structured::constraint(structured, ready)?;
    // The calls' grammar holds from the first token: for `required` and a
    // named tool the output is calls; for `auto`, free text or calls.
    // `auto` beside `response_format` leaves the output to the format (as
    // vLLM does); a lazy grammar (a trigger of several tokens) is not
    // enforced, only parsed.
    let forcing = !matches!(tools.choice, ToolChoice::Auto);
    if let Some(g) = valid.tool_grammar.as_ref().filter(|g| !g.is_lazy()) {
        match (&constraint, forcing) {
            (Some(_), true) => {
                return Err(AppError::invalid(
                    "tool_choice",
                    "A `tool_choice` that forces a call cannot be combined with `response_format`, `structured_outputs` or `guided_*`.",
                ));
            }
            (Some(_), false) => {
                tracing::debug!("tool_choice auto beside a response format: the format holds");
            }
            (None, _) => {
                let spec = ConstraintSpec::Lark(g.lark.clone());
                let compiled = ready.pipeline().compile_constraint(&spec).map_err(|e| {
                    AppError::invalid("tools", format!("`tools`: the calls' grammar: {e}"))
                })?;
                constraint = Some(compiled);
                // A started call can only end valid: its arguments may
                // stream as they come.
                valid.parser.stream_arguments = true;
            }
        }
    } else if valid.tool_grammar.is_some() {
        tracing::debug!("tool calls in this vocabulary start with several tokens: parsed, not enforced");
    }
    Ok(valid.constrained(constraint))
}

/// `chat_template_kwargs`: an object whose keys do not replace what the
/// request sets itself.
fn check_template_kwargs(
    kwargs: Option<serde_json::Value>,
) -> Result<Option<serde_json::Value>, AppError> {
    match kwargs {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Object(map)) => {
            for key in ["messages", "tools", "documents", "add_generation_prompt"] {
                if map.contains_key(key) {
                    return Err(AppError::invalid(
                        "chat_template_kwargs",
                        format!("`chat_template_kwargs` may not set `{key}`: it comes from the request."),
                    ));
                }
            }
            Ok(Some(serde_json::Value::Object(map)))
        }
        Some(other) => Err(AppError::invalid(
            "chat_template_kwargs",
            format!("`chat_template_kwargs` must be a JSON object. Given: {other}"),
        )),
    }
}

/// Checks a `/v1/completions` request.
pub fn completion(
    req: CompletionRequest,
    ready: &Ready,
    served: &str,
) -> Result<ValidRequest, AppError> {
    let CompletionRequest {
        completion,
        sampling,
        structured,
    } = req;
    let echo = completion.echo.unwrap_or(false);
    let common = Common::check(sampling, ready, served, echo)?;
    if completion.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(AppError::invalid("suffix", "`suffix` is not supported."));
    }
    if let Some(b) = completion.best_of {
        if b != common.n as i64 {
            return Err(AppError::invalid(
                "best_of",
                format!("`best_of` is not supported; leave it out or set it to `n`. Given: {b}"),
            ));
        }
    }
    let logprobs = match completion.logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(AppError::invalid(
                "logprobs",
                format!("`logprobs` must be in [0, {MAX_TOP_LOGPROBS}]. Given: {k}"),
            ))
        }
    };
    let pipeline = ready.pipeline();
    let want_texts = echo && logprobs.is_some();
    let prompts = match completion.prompt {
        Prompt::Text(s) => vec![text_prompt(pipeline, s, want_texts)?],
        Prompt::Texts(v) => {
            non_empty(v.len())?;
            v.into_iter()
                .map(|s| text_prompt(pipeline, s, want_texts))
                .collect::<Result<Vec<_>, _>>()?
        }
        Prompt::Tokens(ids) => vec![id_prompt(pipeline, ids, echo, want_texts)?],
        Prompt::TokenLists(lists) => {
            non_empty(lists.len())?;
            lists
                .into_iter()
                .map(|ids| id_prompt(pipeline, ids, echo, want_texts))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    if prompts.len() * common.n > MAX_CHOICES {
        return Err(AppError::invalid(
            "n",
            format!(
                "`n` times the number of prompts must be <= {MAX_CHOICES}. Given: {} x {}",
                common.n,
                prompts.len()
            ),
        ));
    }
    let valid = common.build(prompts, logprobs, echo, "prompt", ready)?;
    let constraint = structured::constraint(structured, ready)?;
    Ok(valid.constrained(constraint))
}

/// The roles of OpenAI's chat API. Templates skip roles they do not know
/// without a word, so another role would vanish from the prompt.
pub const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

fn to_message(i: usize, m: WireMessage) -> Result<Message, AppError> {
    if m.role.trim().is_empty() {
        return Err(AppError::invalid(
            &format!("messages[{i}].role"),
            format!("`messages[{i}].role` must not be empty."),
        ));
    }
    if !ROLES.contains(&m.role.as_str()) {
        return Err(AppError::invalid(
            &format!("messages[{i}].role"),
            format!(
                "`messages[{i}].role` must be one of {}. Given: {:?}",
                ROLES.join(", "),
                m.role
            ),
        ));
    }
    let content = match m.content {
        // Only an assistant turn that called tools may come without text.
        None if m.role == "assistant" => String::new(),
        None => {
            return Err(AppError::invalid(
                &format!("messages[{i}].content"),
                format!(
                    "`messages[{i}].content` must be a string or a list of content parts for a {} message. Given: null",
                    m.role
                ),
            ))
        }
        Some(Content::Text(s)) => s,
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => texts.push(t),
                    (kind, _) => {
                        let param = format!("messages[{i}].content[{j}]");
                        return Err(AppError::invalid(
                            &param,
                            format!(
                                "`{param}`: only text parts (type \"text\" with a `text` field) are supported. Given type: {kind:?}"
                            ),
                        ));
                    }
                }
            }
            texts.join("\n")
        }
    };
    let tool_calls = match m.tool_calls {
        Some(calls) => Some(tools::calls_for_template(i, calls)?),
        None => None,
    };
    let message = Message {
        role: m.role,
        content,
        tool_calls,
        tool_call_id: m.tool_call_id,
        name: m.name,
        reasoning_content: m.reasoning_content,
    };
    tools::check_message(i, &message)?;
    Ok(message)
}

fn non_empty(len: usize) -> Result<(), AppError> {
    if len == 0 {
        Err(AppError::invalid(
            "prompt",
            "`prompt` must not be an empty list.",
        ))
    } else {
        Ok(())
    }
}

fn text_prompt(
    pipeline: &Pipeline,
    text: String,
    want_texts: bool,
) -> Result<ValidPrompt, AppError> {
    let ids = pipeline
        .tokenizer
        .encode_prompt(&text)
        .map_err(|e| AppError::from(e).or_param("prompt"))?;
    let token_texts = token_texts(pipeline, &ids, want_texts)?;
    Ok(ValidPrompt {
        ids,
        text,
        token_texts,
    })
}

fn id_prompt(
    pipeline: &Pipeline,
    ids: Vec<i64>,
    echo: bool,
    want_texts: bool,
) -> Result<ValidPrompt, AppError> {
    let vocab = pipeline.model.config().vocab_size;
    let ids = ids
        .into_iter()
        .map(|id| match u32::try_from(id) {
            Ok(v) if (v as usize) < vocab => Ok(v),
            _ => Err(AppError::invalid(
                "prompt",
                format!("`prompt` token ids must be in [0, {vocab}). Given: {id}"),
            )),
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let text = if echo {
        pipeline
            .tokenizer
            .decode(&ids, false)
            .map_err(|e| AppError::from(e).or_param("prompt"))?
    } else {
        String::new()
    };
    let token_texts = token_texts(pipeline, &ids, want_texts)?;
    Ok(ValidPrompt {
        ids,
        text,
        token_texts,
    })
}

fn token_texts(pipeline: &Pipeline, ids: &[u32], want: bool) -> Result<Vec<String>, AppError> {
    if !want {
        return Ok(Vec::new());
    }
    ids.iter()
        .map(|&id| {
            pipeline
                .tokenizer
                .decode(&[id], false)
                .map_err(|e| AppError::from(e).or_param("prompt"))
        })
        .collect()
}
