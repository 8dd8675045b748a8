//! `taper generate`: one prompt in, the streamed continuation on stdout,
//! counts and speeds on stderr. With `--chat --tools FILE` the reply is
//! read as the server reads it and printed as one JSON message
//! (`content`, `reasoning_content`, `tool_calls`).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use taper::chat_template::{Message, RenderOptions};
use taper::constraint::ConstraintSpec;
use taper::engine::{self, Event, Request, Sink};
use taper::server::validate::tools::{self, ValidTools};
use taper::stopping::FinishReason;
use taper::tools::parse::{Parsed, ParserConfig};
use taper::tools::prompt_opens_thinking;

use super::{ModelArgs, SamplingArgs};

/// Flags of `taper generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,

    #[command(flatten)]
    sampling: SamplingArgs,

    /// The prompt; `-` reads it from standard input.
    #[arg(long, short = 'p')]
    prompt: String,

    /// Apply the model's chat template (the prompt becomes a user message).
    #[arg(long)]
    chat: bool,

    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,

    /// Offer the tools in FILE (a JSON list in OpenAI's `tools` format) and
    /// print the reply as a JSON message with its parsed `tool_calls`
    /// (with --chat).
    #[arg(
        long,
        value_name = "FILE",
        requires = "chat",
        conflicts_with = "constraint"
    )]
    tools: Option<std::path::PathBuf>,

    /// Constrain the output to JSON valid under the JSON schema in FILE.
    #[arg(long, value_name = "FILE", group = "constraint")]
    json_schema: Option<PathBuf>,

    /// Constrain the whole output to match a regular expression.
    #[arg(long, value_name = "RE", group = "constraint")]
    regex: Option<String>,

    /// Constrain the output to the Lark grammar in FILE (llguidance's
    /// dialect).
    #[arg(long, value_name = "FILE.lark", group = "constraint")]
    grammar: Option<PathBuf>,
}

impl GenerateArgs {
    /// The constraint the flags ask for, read from its file.
    fn constraint_spec(&self) -> anyhow::Result<Option<ConstraintSpec>> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(if let Some(path) = &self.json_schema {
            let schema = serde_json::from_str(&read(path)?)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            Some(ConstraintSpec::JsonSchema(schema))
        } else if let Some(re) = &self.regex {
            Some(ConstraintSpec::Regex(re.clone()))
        } else if let Some(path) = &self.grammar {
            Some(ConstraintSpec::Lark(read(path)?))
        } else {
            None
        })
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompt_text = if args.prompt == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the prompt from stdin")?;
        s
    } else {
        args.prompt.clone()
    };
    let spec = args.constraint_spec()?;
    let tools = match &args.tools {
        Some(path) => Some(read_tools(path)?),
        None => None,
    };
    let pipeline = Arc::new(args.model.load()?);
    if let Some(tools) = tools {
        return run_with_tools(&args, &pipeline, &prompt_text, tools);
    }
    let constraint = match &spec {
        Some(spec) => Some(
            pipeline
                .compile_constraint(spec)
                .with_context(|| format!("--{}", flag_of(spec)))?,
        ),
        None => None,
    };
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &prompt_text));
        pipeline.chat_prompt(&messages, true)?
    } else {
        pipeline.tokenizer.encode_prompt(&prompt_text)?
    };
    let request = Request {
        sampling: args.sampling.params(&pipeline)?,
        stop: args.sampling.stop_conditions(&pipeline, prompt.len()),
        prompt,
        logprobs: None,
        prompt_logprobs: false,
        constraint,
    };
    pipeline.check_fits(request.prompt.len(), request.stop.max_new_tokens)?;

    let cancel = Arc::new(AtomicBool::new(false));
    super::cancel_on_ctrl_c(cancel.clone())?;
    let outcome = super::Outcome::default();
    let sink = super::stdout_sink(cancel, outcome.clone());
    let prompt_len = request.prompt.len();
    engine::run_one(pipeline, request, sink)?;
    let done = outcome.take()?;
    if done.stdout_closed {
        // `taper generate ... | head`: the reader has what it wanted.
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout)?;
    eprintln!(
        "prompt: {} tokens, {:.1} t/s | generated: {} tokens, {:.1} t/s | finish: {}",
        prompt_len,
        done.prefill_tps(),
        done.usage.completion_tokens,
        done.decode_tps(),
        done.finish
    );
    let _ = Ordering::Relaxed;
    Ok(())
}

/// The flag that gave a spec, for messages.
fn flag_of(spec: &ConstraintSpec) -> &'static str {
    match spec {
        ConstraintSpec::JsonSchema(_) => "json-schema",
        ConstraintSpec::Regex(_) => "regex",
        _ => "grammar",
    }
}

/// The checked tools of a `--tools` file.
fn read_tools(path: &std::path::Path) -> anyhow::Result<ValidTools> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the tools in {}", path.display()))?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of tools in OpenAI's format",
            path.display()
        )
    })?;
    tools::check(Some(list), None, None)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.detail.message))
}

/// `--chat --tools`: the whole reply, parsed, as one JSON message.
fn run_with_tools(
    args: &GenerateArgs,
    pipeline: &Arc<taper::pipeline::Pipeline>,
    prompt_text: &str,
    tools: ValidTools,
) -> anyhow::Result<()> {
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", prompt_text));
    let syntax = &pipeline.output;
    eprintln!("tool calls: {}", syntax.tool_format);
    let (messages, template_tools) =
        syntax.prepare(messages, &tools.tools, &tools.choice, tools.parallel);
    let text = pipeline.render_chat(
        &messages,
        &RenderOptions {
            add_generation_prompt: true,
            tools: template_tools.as_ref(),
            ..Default::default()
        },
    )?;
    let prompt = pipeline.tokenizer.encode_plain(&text)?;
    // The calls are enforced as on the server (`tools::grammar`).
    let grammar = taper::tools::grammar::tool_grammar(
        syntax.tool_format,
        syntax.call_tokens,
        &tools.tools,
        &tools.choice,
        tools.parallel,
    )
    .filter(|g| !g.is_lazy());
    let constraint = match &grammar {
        Some(g) => Some(
            pipeline
                .compile_constraint(&taper::constraint::ConstraintSpec::Lark(g.lark.clone()))
                .map_err(|e| anyhow::anyhow!("--tools: the calls' grammar: {e}"))?,
        ),
        None => None,
    };
    let request = Request {
        sampling: args.sampling.params(pipeline)?,
        stop: args.sampling.stop_conditions(pipeline, prompt.len()),
        prompt,
        logprobs: None,
        prompt_logprobs: false,
        constraint,
    };
    pipeline.check_fits(request.prompt.len(), request.stop.max_new_tokens)?;
    let cfg = ParserConfig {
        tools: Some(syntax.tool_format),
        reasoning: syntax.reasoning,
        starts_in_reasoning: syntax.reasoning && prompt_opens_thinking(&text),
        parallel: tools.parallel,
        stream_arguments: grammar.is_some(),
    };

    let cancel = Arc::new(AtomicBool::new(false));
    super::cancel_on_ctrl_c(cancel.clone())?;
    let pieces = Arc::new(std::sync::Mutex::new(Vec::new()));
    let finish = Arc::new(std::sync::Mutex::new(None));
    let sink: Box<dyn Sink> = {
        let (pieces, finish, cancel) = (pieces.clone(), finish.clone(), cancel.clone());
        Box::new(move |event: Event| {
            match event {
                Event::Token { id, text, .. } => {
                    if let Ok(mut p) = pieces.lock() {
                        p.push((id, text));
                    }
                }
                Event::Done { finish: f, .. } => {
                    if let Ok(mut slot) = finish.lock() {
                        *slot = Some(Ok(f));
                    }
                }
                Event::Error(e) => {
                    if let Ok(mut slot) = finish.lock() {
                        *slot = Some(Err(e));
                    }
                }
                Event::PromptLogprobs(_) => {}
            }
            !cancel.load(Ordering::SeqCst)
        })
    };
    engine::run_one(pipeline.clone(), request, sink)?;
    let finish = match finish.lock().map(|mut f| f.take()) {
        Ok(Some(Ok(f))) => f,
        Ok(Some(Err(e))) => anyhow::bail!(e),
        _ => FinishReason::Cancelled,
    };
    let pieces = pieces
        .lock()
        .map(|p| p.clone())
        .map_err(|_| anyhow::anyhow!("output state poisoned"))?;
    let parsed = Parsed::from_tokens(cfg, &syntax.special_markers, &pieces);
    let calls: Vec<serde_json::Value> = parsed
        .calls
        .iter()
        .map(|c| {
            serde_json::json!({"id": c.id, "type": "function",
                "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    let finish_reason = match finish {
        FinishReason::Stop if !calls.is_empty() => "tool_calls",
        FinishReason::Length => "length",
        _ => "stop",
    };
    let message = serde_json::json!({
        "content": parsed.content,
        "reasoning_content": (!parsed.reasoning.is_empty()).then_some(&parsed.reasoning),
        "tool_calls": calls,
        "finish_reason": finish_reason,
    });
    println!("{}", serde_json::to_string_pretty(&message)?);
    Ok(())
}
