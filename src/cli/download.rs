//! `taper download`: fetch a model into the Hub cache and print where its
//! files are.

use clap::Args;

use taper::hub::ResolvedModel;

/// Flags of `taper download`.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// A Hub repo id (`org/name`) or a local folder.
    #[arg(long, short = 'm')]
    model: String,

    /// Hub revision: a branch, tag or commit.
    #[arg(long)]
    revision: Option<String>,

    /// Fetch this GGUF file of the repo (and the tokenizer files beside it)
    /// instead of config.json and safetensors.
    #[arg(long, value_name = "NAME.gguf")]
    gguf_file: Option<String>,
}

pub fn run(args: DownloadArgs) -> anyhow::Result<()> {
    let model = super::ModelArgs {
        model: args.model,
        gguf_file: args.gguf_file,
        revision: args.revision,
        device: "cpu".into(),
        dtype: "auto".into(),
        quant: "none".into(),
        chat_template: None,
        threads: None,
    };
    let (first, weights, optional) = match model.resolve()? {
        ResolvedModel::Safetensors(files) => (
            Some(files.config),
            files.weights,
            [
                files.generation_config,
                files.tokenizer,
                files.tokenizer_config,
            ],
        ),
        ResolvedModel::Gguf(files) => (
            None,
            vec![files.gguf],
            [
                files.generation_config,
                files.tokenizer,
                files.tokenizer_config,
            ],
        ),
    };
    for f in first
        .iter()
        .chain(optional.iter().flatten())
        .chain(&weights)
    {
        println!("{}", f.display());
    }
    Ok(())
}
