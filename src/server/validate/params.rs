//! The parameters both endpoints share — sampling, stopping, `n`,
//! streaming — checked against their ranges and merged over the server's
//! defaults, and the engine requests built from them, one per choice.

use crate::engine::Request;
use crate::sampling::SamplingParams;
use crate::stopping::StopConditions;
use crate::tools::parse::ParserConfig;
use crate::Error;

use crate::server::error::AppError;
use crate::server::request::SamplingFields;
use crate::server::state::Ready;

use super::{ValidPrompt, ValidRequest, MAX_CHOICES, MAX_STOP_STRINGS};

/// The checked fields both endpoints share.
pub(super) struct Common {
    sampling: SamplingParams,
    stop: Vec<String>,
    max_tokens: Option<usize>,
    ignore_eos: bool,
    pub(super) n: usize,
    stream: bool,
    include_usage: bool,
}

impl Common {
    /// `allow_zero_tokens`: `max_tokens: 0` is meaningful when the prompt is
    /// echoed (scoring a text by its logprobs).
    pub(super) fn check(
        f: SamplingFields,
        ready: &Ready,
        served: &str,
        allow_zero_tokens: bool,
    ) -> Result<Self, AppError> {
        if let Some(model) = f.model.as_deref() {
            if model != served {
                return Err(AppError::model_not_found(model, served));
            }
        }
        let n = f.n.unwrap_or(1);
        if !(1..=MAX_CHOICES as i64).contains(&n) {
            return Err(AppError::invalid(
                "n",
                format!("`n` must be in [1, {MAX_CHOICES}]. Given: {n}"),
            ));
        }
        let min_tokens = if allow_zero_tokens { 0 } else { 1 };
        let max_tokens = match f.max_tokens {
            Some(m) if m < min_tokens => {
                return Err(AppError::invalid(
                    "max_tokens",
                    format!("`max_tokens` must be >= {min_tokens}. Given: {m}"),
                ))
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };

        let defaults = &ready.defaults;
        let mut p = defaults.sampling.clone();
        if let Some(t) = f.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(AppError::invalid(
                    "temperature",
                    format!("`temperature` must be in [0, 2]. Given: {t}"),
                ));
            }
            p.temperature = t;
        }
        if let Some(v) = f.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(AppError::invalid(
                    "top_p",
                    format!("`top_p` must be in (0, 1]. Given: {v}"),
                ));
            }
            p.top_p = v;
        }
        if let Some(k) = f.top_k {
            p.top_k = match k {
                -1 | 0 => None,
                k if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
                k => {
                    return Err(AppError::invalid(
                        "top_k",
                        format!("`top_k` must be -1 or 0 (off), or >= 1. Given: {k}"),
                    ))
                }
            };
        }
        if let Some(v) = f.min_p {
            p.min_p = v;
        }
        if let Some(v) = f.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = f.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = f.frequency_penalty {
            p.frequency_penalty = v;
        }
        if let Some(seed) = f.seed {
            // Negative seeds are valid in OpenAI's API; reinterpret the bits.
            p.seed = Some(seed as u64);
        }
        if let Some(bias) = f.logit_bias {
            let mut entries = bias
                .into_iter()
                .map(|(key, b)| match key.trim().parse::<u32>() {
                    Ok(id) => Ok((id, b)),
                    Err(_) => Err(AppError::invalid(
                        "logit_bias",
                        format!("`logit_bias` keys must be token ids. Given: {key:?}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            entries.sort_by_key(|&(id, _)| id);
            p.logit_bias = entries;
        }
        let pipeline = ready.pipeline();
        p.validate(pipeline.model.config().vocab_size)?;

        let stop = match f.stop {
            Some(s) => s.into_vec(),
            None => defaults.stop.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(AppError::invalid(
                "stop",
                format!(
                    "`stop` may hold at most {MAX_STOP_STRINGS} strings. Given: {}",
                    stop.len()
                ),
            ));
        }
        let stream = f.stream.unwrap_or(false);
        if f.stream_options.is_some() && !stream {
            return Err(AppError::invalid(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true.",
            ));
        }
        let include_usage = f
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(Common {
            sampling: p,
            stop,
            max_tokens,
            ignore_eos: f.ignore_eos.unwrap_or(defaults.ignore_eos),
            n: n as usize,
            stream,
            include_usage,
        })
    }

    /// One engine request per choice. A seeded request gives choice `i` of
    /// each prompt the seed `seed + i`, so choices differ and each one is
    /// reproducible alone.
    pub(super) fn build(
        self,
        prompts: Vec<ValidPrompt>,
        logprobs: Option<usize>,
        echo: bool,
        prompt_param: &str,
        ready: &Ready,
    ) -> Result<ValidRequest, AppError> {
        let pipeline = ready.pipeline();
        let choices = prompts.len() * self.n;
        if let Some(capacity) = ready.capacity.filter(|&c| choices > c) {
            // Every choice is a request in the engine; a 429 would send the
            // client retrying something that cannot fit even when idle.
            let asked = if prompts.len() > 1 {
                format!(
                    "{} prompts x `n` {} = {choices} choices",
                    prompts.len(),
                    self.n
                )
            } else {
                format!("`n` is {choices}")
            };
            return Err(AppError::invalid(
                "n",
                format!(
                    "`n` times the number of prompts must be <= {capacity}, the requests this server runs or queues at once (--max-batch + --max-queue). Given: {asked}"
                ),
            ));
        }
        let mut requests = Vec::with_capacity(choices);
        for prompt in &prompts {
            let max_new_tokens = self
                .max_new_tokens(prompt.ids.len(), ready)
                .map_err(|e| e.or_param(prompt_param))?;
            for i in 0..self.n {
                let mut sampling = self.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                requests.push(Request {
                    prompt: prompt.ids.clone(),
                    sampling,
                    stop: StopConditions {
                        eos_ids: pipeline.eos_ids.clone(),
                        stop_strings: self.stop.clone(),
                        max_new_tokens,
                        ignore_eos: self.ignore_eos,
                    },
                    logprobs,
                    prompt_logprobs: echo && logprobs.is_some(),
                    constraint: None,
                });
            }
        }
        Ok(ValidRequest {
            prompts,
            requests,
            n: self.n,
            stream: self.stream,
            include_usage: self.include_usage,
            echo,
            logprobs,
            parser: ParserConfig {
                tools: None,
                reasoning: false,
                starts_in_reasoning: false,
                parallel: true,
            stream_arguments: false,
            },
            special_markers: Vec::new(),
            tool_grammar: None,
        })
    }

    /// The request's `max_tokens` if the prompt and it fit the context (never
    /// truncated); without one, the default clamped to what fits. The
    /// context is the server's ([`Ready::context_len`]): a sequence the KV
    /// budget cannot hold would only fail later, in the engine.
    fn max_new_tokens(&self, prompt_len: usize, ready: &Ready) -> Result<usize, AppError> {
        let context = ready.context_len;
        let what = if ready.kv_limited() {
            format!(
                "the {context} positions this server's KV cache holds (--kv-cache-mem; the model's context is {})",
                ready.pipeline().context_len()
            )
        } else {
            format!("the model's context of {context} tokens")
        };
        if prompt_len == 0 {
            return Err(Error::InvalidRequest("the prompt is empty".into()).into());
        }
        match self.max_tokens {
            Some(m) => {
                if prompt_len.saturating_add(m) > context {
                    return Err(Error::ContextLength(format!(
                        "the prompt ({prompt_len} tokens) plus max_tokens ({m}) exceeds {what}"
                    ))
                    .into());
                }
                Ok(m)
            }
            None => {
                if prompt_len >= context {
                    return Err(Error::ContextLength(format!(
                        "the prompt ({prompt_len} tokens) leaves no room for new tokens in {what}"
                    ))
                    .into());
                }
                let room = context - prompt_len;
                Ok(ready.defaults.max_tokens.map_or(room, |d| d.min(room)))
            }
        }
    }
}
