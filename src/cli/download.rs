//! `taper download`: fetch a model into the Hub cache and print where its
//! files are.

use clap::Args;

/// Flags of `taper download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// A Hub repo id (`org/name`) or a local folder.
    #[arg(long, short = 'm')]
    model: String,

    /// Hub revision: a branch, tag or commit.
    #[arg(long)]
    revision: Option<String>,
}

pub fn run(args: DownloadArgs) -> anyhow::Result<()> {
    let model = super::ModelArgs {
        model: args.model,
        revision: args.revision,
        device: "cpu".into(),
        dtype: "auto".into(),
        quant: "none".into(),
        chat_template: None,
        threads: None,
    };
    let files = model.resolve()?;
    println!("{}", files.config.display());
    for f in [
        &files.generation_config,
        &files.tokenizer,
        &files.tokenizer_config,
    ]
    .into_iter()
    .flatten()
    {
        println!("{}", f.display());
    }
    for w in &files.weights {
        println!("{}", w.display());
    }
    Ok(())
}
