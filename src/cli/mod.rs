//! Command-line interface: clap definitions, and turning flags into the
//! library's typed configs. `anyhow` lives here and nowhere in the library.

mod bench;
mod chat;
mod download;
mod generate;
mod model_args;
mod sampling_args;
mod serve;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use taper::engine::{Event, Sink, Timing, Usage};
use taper::stopping::FinishReason;

use clap::{Parser, Subcommand};

pub use model_args::ModelArgs;
pub use sampling_args::SamplingArgs;

/// A Hugging Face-compatible LLM inference runtime.
#[derive(Debug, Parser)]
#[command(name = "taper", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Chat with a model in the terminal.
    Chat(chat::ChatArgs),
    /// Generate a continuation of one prompt.
    Generate(generate::GenerateArgs),
    /// Fetch a model's files into the Hub cache without running it.
    Download(download::DownloadArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Measure prompt processing and generation speed (llama-bench's method).
    Bench(bench::BenchCli),
}

/// Parses the command line and runs the chosen command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Chat(args) => chat::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Download(args) => download::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Ctrl-C sets `cancel` (the reply being generated stops); a second Ctrl-C
/// before the flag is cleared exits, so a stuck load can still be left.
pub fn cancel_on_ctrl_c(cancel: Arc<AtomicBool>) -> anyhow::Result<()> {
    ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    })?;
    Ok(())
}

/// What a request run from the terminal ended with.
pub struct Finished {
    pub text: String,
    /// Writing to stdout failed (a closed pipe): the reply was cut short.
    pub stdout_closed: bool,
    pub finish: FinishReason,
    pub usage: Usage,
    pub timing: Timing,
}

impl Finished {
    /// Prompt tokens computed per second (cached ones excluded).
    pub fn prefill_tps(&self) -> f64 {
        let n = self.usage.prompt_tokens - self.usage.cached_tokens;
        rate(n, self.timing.prefill_secs)
    }

    /// Tokens per second after the first.
    pub fn decode_tps(&self) -> f64 {
        rate(
            self.usage.completion_tokens.saturating_sub(1),
            self.timing.decode_secs,
        )
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

#[derive(Default)]
struct OutcomeInner {
    text: String,
    stdout_closed: bool,
    done: Option<(FinishReason, Usage, Timing)>,
    error: Option<String>,
}

/// Collects a terminal request's text and ending from its sink.
#[derive(Clone, Default)]
pub struct Outcome(Arc<Mutex<OutcomeInner>>);

impl Outcome {
    /// The ending; a request cancelled before `Done` reads as cancelled.
    pub fn take(&self) -> anyhow::Result<Finished> {
        let mut inner = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("output state poisoned"))?;
        if let Some(e) = inner.error.take() {
            anyhow::bail!(e);
        }
        let text = std::mem::take(&mut inner.text);
        let stdout_closed = inner.stdout_closed;
        Ok(match inner.done.take() {
            Some((finish, usage, timing)) => Finished {
                text,
                stdout_closed,
                finish,
                usage,
                timing,
            },
            None => Finished {
                text,
                stdout_closed,
                finish: FinishReason::Cancelled,
                usage: Usage::default(),
                timing: Timing::default(),
            },
        })
    }
}

/// A sink that streams text to stdout, stops when `cancel` is set (Ctrl-C)
/// or stdout is closed, and records the ending in `outcome`.
pub fn stdout_sink(cancel: Arc<AtomicBool>, outcome: Outcome) -> Box<dyn Sink> {
    Box::new(move |event: Event| {
        let Ok(mut inner) = outcome.0.lock() else {
            return false;
        };
        match event {
            Event::Token { text, .. } => {
                inner.text.push_str(&text);
                let mut out = std::io::stdout().lock();
                if out
                    .write_all(text.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    return false;
                }
            }
            Event::Done {
                finish,
                usage,
                timing,
            } => inner.done = Some((finish, usage, timing)),
            Event::Error(e) => inner.error = Some(e),
            Event::PromptLogprobs(_) => {}
        }
        !cancel.load(Ordering::SeqCst)
    })
}
