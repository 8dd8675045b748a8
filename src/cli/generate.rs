//! `taper generate`: one prompt in, the streamed continuation on stdout,
//! counts and speeds on stderr.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use taper::chat_template::Message;
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
    let pipeline = Arc::new(args.model.load()?);
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
        constraint: None,
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
