//! Command-line interface: clap definitions, and turning flags into the
//! library's typed configs. `anyhow` lives here and nowhere in the library.

mod chat;
mod download;
mod generate;
mod model_args;
mod sampling_args;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

/// Parses the command line and runs the chosen command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Chat(args) => chat::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Download(args) => download::run(args),
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
