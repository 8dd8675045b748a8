//! Flags shared by every command that loads a model, and the loading itself
//! (with a spinner while it loads and a one-line summary after).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use taper::device::{DTypeSpec, DeviceSpec};
use taper::hub::{self, HubOptions, ModelFiles, ModelSource};
use taper::pipeline::Pipeline;
use taper::quant::Quant;

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

    /// none, or q8_0: quantize every linear projection to 8 bits at load
    /// (about 4x less memory than f32, faster on CPUs; CPU only).
    #[arg(long, default_value = "none")]
    pub quant: String,

    /// A Jinja chat template file to use instead of tokenizer_config.json's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

impl ModelArgs {
    /// Resolves the model's files (downloading what is missing).
    pub fn resolve(&self) -> anyhow::Result<ModelFiles> {
        let source = ModelSource::parse(&self.model, self.revision.as_deref())?;
        let files = hub::resolve(&source, &HubOptions::from_env())
            .with_context(|| format!("resolving model '{}'", self.model))?;
        Ok(files)
    }

    /// Resolves and loads the model with its tokenizer and template,
    /// reporting what was loaded on stderr.
    pub fn load(&self) -> anyhow::Result<Pipeline> {
        let files = self.resolve()?;
        let device = self.device.parse::<DeviceSpec>()?.open()?;
        let dtype = self.dtype.parse::<DTypeSpec>()?.resolve(&device);
        let quant = self.quant.parse::<Quant>()?;
        let spinner = indicatif::ProgressBar::new_spinner();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            spinner.set_message(format!("loading {}", self.model));
            spinner.enable_steady_tick(Duration::from_millis(100));
        } else {
            spinner.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let start = Instant::now();
        let loaded = Pipeline::load(&files, dtype, &device, quant, self.chat_template.as_deref());
        spinner.finish_and_clear();
        let pipeline = loaded.with_context(|| format!("loading model '{}'", self.model))?;
        let cfg = pipeline.model.config();
        let device_name = match self.device.parse::<DeviceSpec>()? {
            DeviceSpec::Cpu => "cpu".to_string(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
            DeviceSpec::Metal => "metal".to_string(),
        };
        let precision = match quant {
            Quant::None => format!("{dtype:?}"),
            quant => format!("{dtype:?}, {quant} projections"),
        };
        eprintln!(
            "loaded {} ({}, {:.1}M parameters, {}, {:.0} MiB of weights, {}) in {:.2}s",
            self.model,
            cfg.architecture.class_name(),
            pipeline.model.num_parameters() as f64 / 1e6,
            precision,
            pipeline.model.weight_bytes() as f64 / (1 << 20) as f64,
            device_name,
            start.elapsed().as_secs_f64()
        );
        Ok(pipeline)
    }
}
