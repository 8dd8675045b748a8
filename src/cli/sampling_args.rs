//! Sampling and stopping flags shared by `generate`, `chat` and `serve`.
//! Unset flags fall back to generation_config.json.

use clap::Args;

use taper::pipeline::Pipeline;
use taper::sampling::SamplingParams;
use taper::stopping::StopConditions;

/// Flags that shape how tokens are picked and when generation stops.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Maximum new tokens (default: what fits in the context, at most 512).
    #[arg(long, short = 'n')]
    pub max_tokens: Option<usize>,

    /// 0 for greedy decoding.
    #[arg(long)]
    pub temperature: Option<f32>,

    /// Nucleus sampling: keep the smallest set of tokens whose mass reaches P.
    #[arg(long)]
    pub top_p: Option<f32>,

    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Drop tokens less likely than MIN_P times the most likely one.
    #[arg(long)]
    pub min_p: Option<f32>,

    /// Penalise tokens already seen (1.0: off).
    #[arg(long)]
    pub repeat_penalty: Option<f32>,

    /// OpenAI presence penalty (-2..2).
    #[arg(long)]
    pub presence_penalty: Option<f32>,

    /// OpenAI frequency penalty (-2..2).
    #[arg(long)]
    pub frequency_penalty: Option<f32>,

    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Stop when this string is generated (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,

    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

/// New tokens when neither the flag nor generation_config.json says.
const DEFAULT_MAX_TOKENS: usize = 512;

impl SamplingArgs {
    /// generation_config.json's defaults with the flags applied on top.
    pub fn params(&self, pipeline: &Pipeline) -> anyhow::Result<SamplingParams> {
        let mut p = pipeline.default_sampling();
        if let Some(t) = self.temperature {
            p.temperature = t;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(k) = self.top_k {
            p.top_k = Some(k);
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repeat_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        p.seed = self.seed;
        p.validate(pipeline.model.config().vocab_size)?;
        Ok(p)
    }

    /// Stop conditions for a prompt of `prompt_len` tokens. An explicit
    /// `--max-tokens` that does not fit is left for the generator to reject;
    /// the default shrinks to what fits.
    pub fn stop_conditions(&self, pipeline: &Pipeline, prompt_len: usize) -> StopConditions {
        let room = pipeline.context_len().saturating_sub(prompt_len);
        let max_new_tokens = match self.max_tokens {
            Some(n) => n,
            None => pipeline
                .generation
                .max_new_tokens
                .unwrap_or(DEFAULT_MAX_TOKENS)
                .min(room),
        };
        StopConditions {
            eos_ids: pipeline.eos_ids.clone(),
            stop_strings: self.stop.clone(),
            max_new_tokens,
            ignore_eos: self.ignore_eos,
        }
    }
}
