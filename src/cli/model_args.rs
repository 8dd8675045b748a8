//! Flags shared by every command that loads a model, and the loading itself
//! (with a spinner while it loads and a one-line summary after).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use taper::device::{DTypeSpec, DeviceSpec};
use taper::hub::{self, HubOptions, ModelRequest, ResolvedModel};
use taper::pipeline::Pipeline;
use taper::quant::Quant;

/// Where the model comes from and where it runs.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hub repo id (`org/name`), a local folder with config.json and
    /// safetensors, or a local .gguf file.
    #[arg(long, short = 'm')]
    pub model: String,

    /// Load the model from this GGUF file of the repo or folder (its
    /// tokenizer.json is used when present, else the GGUF's own tokenizer).
    #[arg(long, value_name = "NAME.gguf")]
    pub gguf_file: Option<String>,

    /// Hub revision: a branch, tag or commit.
    #[arg(long)]
    pub revision: Option<String>,

    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// auto, f32, f16 or bf16 (auto: f32 on CPU, bf16 on GPUs).
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// none, q8_0, q6_k, q4_k or q4_0: quantize every linear projection at
    /// load, in llama.cpp's formats (8.5, 6.56, 4.5 and 4.5 bits a weight:
    /// 4 to 7x less memory than f32, and faster on CPUs; CPU only). q4_k and
    /// q4_0 keep the output head in q6_k, as llama.cpp's Q4_K_M does.
    #[arg(long, default_value = "none")]
    pub quant: String,

    /// A Jinja chat template file to use instead of tokenizer_config.json's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,

    /// CPU threads for every matrix product; sets (and overrides)
    /// RAYON_NUM_THREADS and CANDLE_NUM_THREADS [default: physical cores
    /// available to the process].
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// Resolves the model's files (downloading what is missing).
    pub fn resolve(&self) -> anyhow::Result<ResolvedModel> {
        let request = ModelRequest::parse(
            &self.model,
            self.revision.as_deref(),
            self.gguf_file.as_deref(),
        )?;
        let files = hub::resolve_request(&request, &HubOptions::from_env())
            .with_context(|| format!("resolving model '{}'", self.model))?;
        Ok(files)
    }

    /// Fixes the CPU thread count before any pool starts, returning it.
    ///
    /// Why always, not only when `--threads` is given: candle 0.11 asks
    /// `num_cpus::get_physical()` (which parses /proc/cpuinfo) on every
    /// matmul unless RAYON_NUM_THREADS is set, which cost ~5% of decode.
    pub fn apply_threads(&self) -> anyhow::Result<usize> {
        let threads = match self.threads {
            Some(0) => anyhow::bail!("`--threads` must be >= 1. Given: 0"),
            Some(t) => t,
            None => match std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                Some(t) if t > 0 => t,
                _ => taper::bench::physical_cores(),
            },
        };
        let candle_threads = taper::bench::set_cpu_threads(threads);
        if candle_threads != threads {
            eprintln!("warning: candle reports {candle_threads} threads, not {threads}");
        }
        Ok(threads)
    }

    /// Resolves and loads the model with its tokenizer and template,
    /// reporting what was loaded on stderr.
    pub fn load(&self) -> anyhow::Result<Pipeline> {
        self.apply_threads()?;
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
        let loaded =
            Pipeline::load_resolved(&files, dtype, &device, quant, self.chat_template.as_deref());
        spinner.finish_and_clear();
        let pipeline = loaded.with_context(|| format!("loading model '{}'", self.model))?;
        let cfg = pipeline.model.config();
        let device_name = match self.device.parse::<DeviceSpec>()? {
            DeviceSpec::Cpu => "cpu".to_string(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
            DeviceSpec::Metal => "metal".to_string(),
        };
        // What the projections are stored as: `--quant`'s format, or the
        // ones a GGUF file holds.
        let formats = pipeline.model.projection_formats();
        let precision = if formats.is_empty() {
            format!("{dtype:?}")
        } else {
            let names: Vec<String> = formats.iter().map(Quant::to_string).collect();
            format!("{dtype:?}, {} projections", names.join("/"))
        };
        eprintln!(
            "loaded {} ({}, {:.1}M parameters, {}, {:.0} MiB of weights, {}) in {:.2}s; tool calls: {}{}",
            self.model,
            cfg.architecture.class_name(),
            pipeline.model.num_parameters() as f64 / 1e6,
            precision,
            pipeline.model.weight_bytes() as f64 / (1 << 20) as f64,
            device_name,
            start.elapsed().as_secs_f64(),
            pipeline.output.tool_format,
            if pipeline.output.reasoning {
                ", thinking in <think>"
            } else {
                ""
            }
        );
        Ok(pipeline)
    }
}
