//! `taper generate`: one prompt in, the streamed continuation on stdout,
//! counts and speeds on stderr.

use std::io::{Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use taper::chat_template::Message;
use taper::generate::generate;
use taper::sampling::Sampler;

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
    let pipeline = args.model.load()?;
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
    let mut sampler = Sampler::new(args.sampling.params(&pipeline)?);
    let stop = args.sampling.stop_conditions(&pipeline, prompt.len());

    let cancel = Arc::new(AtomicBool::new(false));
    super::cancel_on_ctrl_c(cancel.clone())?;
    let mut cache = pipeline.model.new_cache();
    let mut stdout = std::io::stdout().lock();
    let result = generate(
        &pipeline.model,
        &pipeline.tokenizer,
        &mut cache,
        &prompt,
        &mut sampler,
        &stop,
        &cancel,
        &mut |piece| {
            stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
                .map_err(|e| taper::Error::io("stdout", e))
        },
    );
    let gen = match result {
        Ok(g) => g,
        Err(taper::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    writeln!(stdout)?;
    let s = gen.stats;
    eprintln!(
        "prompt: {} tokens, {:.1} t/s | generated: {} tokens, {:.1} t/s | finish: {}",
        s.prompt_tokens,
        s.prefill_tps(),
        s.generated_tokens,
        s.decode_tps(),
        gen.finish
    );
    Ok(())
}
