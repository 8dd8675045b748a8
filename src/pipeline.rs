//! A model ready to chat: the decoder, its tokenizer, its chat template and
//! its generation defaults, loaded together from one model source.
//!
//! The CLI and the server both start here; neither knows about files.

use std::path::Path;

use candle_core::{DType, Device};

use crate::chat_template::{ChatTemplate, Message, RenderOptions};
use crate::config::GenerationConfig;
use crate::hub::ModelFiles;
use crate::models::Decoder;
use crate::quant::Quant;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Everything needed to turn text into a reply.
pub struct Pipeline {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
    /// Token ids that end a reply: generation_config.json's, then config.json's
    /// and the tokenizer's EOS.
    pub eos_ids: Vec<u32>,
}

impl Pipeline {
    /// Loads every part from resolved files. `chat_template` overrides the
    /// template of tokenizer_config.json; `quant` stores the model's linear
    /// projections quantized (CPU only).
    pub fn load(
        files: &ModelFiles,
        dtype: DType,
        device: &Device,
        quant: Quant,
        chat_template: Option<&Path>,
    ) -> Result<Self> {
        let tokenizer_path = files
            .tokenizer
            .as_deref()
            .ok_or_else(|| Error::MissingFile {
                dir: files
                    .config
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                file: "tokenizer.json".into(),
            })?;
        let tokenizer = Tokenizer::from_files(tokenizer_path, files.tokenizer_config.as_deref())?;
        let template = match chat_template {
            Some(path) => Some(ChatTemplate::from_file(
                path,
                files.tokenizer_config.as_deref(),
            )?),
            // tokenizer_config.json's reader also picks up a sibling
            // chat_template.jinja, which takes precedence as in transformers.
            None => match (&files.tokenizer_config, &files.chat_template) {
                (Some(cfg), _) => ChatTemplate::from_tokenizer_config(cfg)?,
                (None, Some(jinja)) => Some(ChatTemplate::from_file(jinja, None)?),
                (None, None) => None,
            },
        };
        let generation = match &files.generation_config {
            Some(p) => GenerationConfig::from_file(p)?,
            None => GenerationConfig::default(),
        };
        let model =
            crate::models::load_quantized(&files.config, &files.weights, dtype, device, quant)?;

        let mut eos_ids = generation.eos_token_ids.clone();
        eos_ids.extend(&model.config().eos_token_ids);
        eos_ids.extend(tokenizer.eos_id());
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));

        Ok(Pipeline {
            model,
            tokenizer,
            template,
            generation,
            eos_ids,
        })
    }

    /// The model's context length in tokens.
    pub fn context_len(&self) -> usize {
        self.model.config().max_position_embeddings
    }

    /// Checks that a prompt and its new tokens fit the context.
    pub fn check_fits(&self, prompt_len: usize, max_new_tokens: usize) -> Result<()> {
        let context = self.context_len();
        if prompt_len == 0 {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if prompt_len + max_new_tokens > context {
            return Err(Error::ContextLength(format!(
                "the prompt ({prompt_len} tokens) plus max_tokens ({max_new_tokens}) exceeds the model's context of {context} tokens"
            )));
        }
        Ok(())
    }

    /// Renders a conversation with the chat template and tokenizes it.
    pub fn chat_prompt(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let template = self.template.as_ref().ok_or_else(|| {
            Error::InvalidRequest(
                "this model has no chat template in tokenizer_config.json; pass one with --chat-template FILE, or use a raw prompt".into(),
            )
        })?;
        let text = template.render(
            messages,
            &RenderOptions {
                add_generation_prompt,
                ..Default::default()
            },
        )?;
        self.tokenizer.encode_plain(&text)
    }

    /// Sampling defaults from generation_config.json, as `transformers`
    /// applies them: greedy unless `do_sample` is set.
    pub fn default_sampling(&self) -> SamplingParams {
        let g = &self.generation;
        let mut p = SamplingParams::default();
        if g.do_sample == Some(true) {
            p.temperature = g.temperature.unwrap_or(1.0) as f32;
            p.top_p = g.top_p.unwrap_or(1.0) as f32;
            p.top_k = g.top_k.filter(|&k| k > 0);
            p.min_p = g.min_p.unwrap_or(0.0) as f32;
        } else {
            p.temperature = 0.0;
        }
        if let Some(r) = g.repetition_penalty {
            p.repetition_penalty = r as f32;
        }
        p
    }
}
