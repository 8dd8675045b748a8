//! Command-line interface: clap definitions, and turning flags into the
//! library's typed configs. `anyhow` lives here and nowhere in the library.

mod download;
mod model_args;

use clap::{Parser, Subcommand};

pub use model_args::ModelArgs;

/// A Hugging Face-compatible LLM inference runtime.
#[derive(Debug, Parser)]
#[command(name = "taper", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch a model's files into the Hub cache without running it.
    Download(download::DownloadArgs),
}

/// Parses the command line and runs the chosen command.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Download(args) => download::run(args),
    }
}
