//! `taper generate`: one prompt in, the streamed continuation on stdout,
//! counts and speeds on stderr.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use taper::chat_template::Message;
use taper::constraint::ConstraintSpec;
use taper::engine::{self, Request};

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
    let pipeline = Arc::new(args.model.load()?);
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
