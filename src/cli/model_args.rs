//! Flags shared by every command that loads a model, and the loading itself.

use std::time::Instant;

use anyhow::Context;
use clap::Args;

use taper::device::{DTypeSpec, DeviceSpec};
use taper::hub::{self, HubOptions, ModelFiles, ModelSource};
use taper::models::Decoder;

/// Where the model comes from and where it runs.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hub repo id (`org/name`) or a local folder with config.json and safetensors.
    #[arg(long, short = 'm')]
    pub model: String,

    /// Hub revision: a branch, tag or commit.
    #[arg(long)]
    pub revision: Option<String>,

    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// auto, f32, f16 or bf16 (auto: f32 on CPU, bf16 on GPUs).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// A model loaded for running, with what the user should know about it.
pub struct Loaded {
    pub model: Decoder,
    pub files: ModelFiles,
}

impl ModelArgs {
    /// Resolves the model's files (downloading what is missing).
    pub fn resolve(&self) -> anyhow::Result<ModelFiles> {
        let source = ModelSource::parse(&self.model, self.revision.as_deref())?;
        let files = hub::resolve(&source, &HubOptions::from_env())
            .with_context(|| format!("resolving model '{}'", self.model))?;
        Ok(files)
    }

    /// Resolves and loads the model, reporting what was loaded on stderr.
    #[allow(dead_code)]
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let files = self.resolve()?;
        let device = self.device.parse::<DeviceSpec>()?.open()?;
        let dtype = self.dtype.parse::<DTypeSpec>()?.resolve(&device);
        let start = Instant::now();
        let model = taper::models::load(&files.config, &files.weights, dtype, &device)?;
        let cfg = model.config();
        eprintln!(
            "loaded {} ({:.2}B parameters, {:?}, {}) in {:.2}s",
            cfg.architecture.class_name(),
            model.num_parameters() as f64 / 1e9,
            dtype,
            if device.is_cpu() { "cpu".to_string() } else { format!("{device:?}") },
            start.elapsed().as_secs_f64()
        );
        Ok(Loaded { model, files })
    }
}
