//! A model ready to chat: the decoder, its tokenizer, its chat template and
//! its generation defaults, loaded together from one model source: a
//! `config.json` with safetensors, or a GGUF file (with its own metadata
//! standing in for whatever companion files the model lacks).
//!
//! The CLI and the server both start here; neither knows about files.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device};

use crate::chat_template::{ChatTemplate, Message, RenderOptions};
use crate::config::GenerationConfig;
use crate::constraint::{Constraint, ConstraintError, ConstraintSpec, TokenTable};
use crate::gguf::{self, GgufFile, GgufWeights};
use crate::hub::{GgufFiles, ModelFiles, ResolvedModel};
use crate::models::{Decoder, Logits, SeqInput};
use crate::quant::Quant;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::tools::OutputSyntax;
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
    /// How the model writes tool calls and whether it thinks, read from its
    /// template and vocabulary at load.
    pub output: OutputSyntax,
    /// The vocabulary for constrained decoding, built on first use (a
    /// model never asked for structured output never pays for it).
    token_table: OnceLock<Result<Arc<TokenTable>, ConstraintError>>,
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
        let template = template_from_files(
            chat_template,
            files.tokenizer_config.as_deref(),
            files.chat_template.as_deref(),
        )?;
        let generation = generation_config(files.generation_config.as_deref())?;
        let model =
            crate::models::load_quantized(&files.config, &files.weights, dtype, device, quant)?;
        Ok(Self::assemble(model, tokenizer, template, generation))
    }

    /// Loads a model from a GGUF file: hyper-parameters and weights from
    /// the file; the tokenizer and chat template from `tokenizer.json` and
    /// `tokenizer_config.json` when the model has them, else from the
    /// file's metadata. Weights stored as Q8_0 stay Q8_0 on the CPU.
    pub fn load_gguf(
        files: &GgufFiles,
        dtype: DType,
        device: &Device,
        quant: Quant,
        chat_template: Option<&Path>,
    ) -> Result<Self> {
        let file = GgufFile::open(&files.gguf)?;
        let config = gguf::model_config(&file)?;
        let tokenizer = match &files.tokenizer {
            Some(path) => Tokenizer::from_files(path, files.tokenizer_config.as_deref())?,
            None => gguf::tokenizer::tokenizer(&file)?,
        };
        let template = match template_from_files(
            chat_template,
            files.tokenizer_config.as_deref(),
            files.chat_template.as_deref(),
        )? {
            Some(template) => Some(template),
            None => gguf::tokenizer::chat_template(&file)?,
        };
        let generation = generation_config(files.generation_config.as_deref())?;
        let weights = GgufWeights::new(&file, &config);
        // The mapping is dropped on return: the model owns copies.
        let model = Decoder::load(config, &weights, dtype, device, quant)?;
        Ok(Self::assemble(model, tokenizer, template, generation))
    }

    /// [`load`](Self::load) or [`load_gguf`](Self::load_gguf), as the files
    /// say, then [`check_computes`](Self::check_computes): what the
    /// commands load, so a broken model fails at start, not at every request.
    pub fn load_resolved(
        files: &ResolvedModel,
        dtype: DType,
        device: &Device,
        quant: Quant,
        chat_template: Option<&Path>,
    ) -> Result<Self> {
        let pipeline = match files {
            ResolvedModel::Safetensors(files) => {
                Self::load(files, dtype, device, quant, chat_template)
            }
            ResolvedModel::Gguf(files) => {
                Self::load_gguf(files, dtype, device, quant, chat_template)
            }
        }?;
        pipeline.check_computes()?;
        Ok(pipeline)
    }

    /// Runs a few tokens through the model and checks every logit is
    /// finite. Weights holding NaN, or config values that load but make
    /// the arithmetic blow up, otherwise surface as a 500 on every request
    /// ("logit of token 0 is NaN"). Costs one forward pass of four tokens.
    pub fn check_computes(&self) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        let bos = self
            .model
            .config()
            .bos_token_id
            .filter(|&b| (b as usize) < vocab);
        let mut tokens: Vec<u32> = bos.into_iter().collect();
        tokens.extend((0..vocab.min(4) as u32).filter(|&t| Some(t) != bos));
        tokens.truncate(4);
        let mut cache = self.model.new_cache();
        cache.reserve(tokens.len());
        let logits = self.model.forward(&mut [SeqInput {
            tokens: &tokens,
            cache: &mut cache,
            logits: Logits::All,
        }])?;
        let Some(logits) = logits.first() else {
            return Err(Error::DoesNotCompute(
                "the forward pass returned no logits".into(),
            ));
        };
        let values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::DoesNotCompute(format!(
                "on the test tokens {tokens:?}, the logit of token {} at position {} is {}; check the weights and the config values (rms_norm_eps, rope_theta, ...)",
                i % vocab.max(1),
                i / vocab.max(1),
                values[i]
            )));
        }
        Ok(())
    }

    /// The parts put together, with the stop tokens of all of them.
    fn assemble(
        model: Decoder,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        generation: GenerationConfig,
    ) -> Self {
        let mut eos_ids = generation.eos_token_ids.clone();
        eos_ids.extend(&model.config().eos_token_ids);
        eos_ids.extend(tokenizer.eos_id());
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));

        let output = OutputSyntax::detect(template.as_ref(), &tokenizer);
        tracing::info!(
            "tool calls: {}; reasoning: {}",
            output.tool_format,
            if output.reasoning { "<think>" } else { "none" }
        );
        Pipeline {
            model,
            tokenizer,
            template,
            generation,
            eos_ids,
            output,
            token_table: OnceLock::new(),
        }
    }

    /// The model's token table for constrained decoding, built the first
    /// time it is asked for (about a second for a 150k vocabulary): as wide
    /// as the logits, ending on [`Pipeline::eos_ids`].
    pub fn token_table(&self) -> Result<Arc<TokenTable>, ConstraintError> {
        self.token_table
            .get_or_init(|| {
                let width = self.model.config().vocab_size;
                let table = TokenTable::new(&self.tokenizer, width, &self.eos_ids)?;
                tracing::info!(
                    "constrained decoding: token table of {} entries built in {:.0} ms",
                    table.width(),
                    table.build_time().as_secs_f64() * 1e3
                );
                Ok(Arc::new(table))
            })
            .clone()
    }

    /// Compiles a structured-output spec for this model: what an
    /// [`crate::engine::Request`]'s `constraint` carries. Takes
    /// milliseconds to seconds: call it off the engine thread.
    pub fn compile_constraint(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        self.token_table()?.compile(spec)
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
        let text = self.render_chat(
            messages,
            &RenderOptions {
                add_generation_prompt,
                ..Default::default()
            },
        )?;
        self.tokenizer.encode_plain(&text)
    }

    /// Renders a conversation with the chat template (tools, template
    /// arguments) to the prompt text.
    pub fn render_chat(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        let template = self.template.as_ref().ok_or_else(|| {
            Error::InvalidRequest(
                "this model has no chat template in tokenizer_config.json; pass one with --chat-template FILE, or use a raw prompt".into(),
            )
        })?;
        template.render(messages, opts)
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

/// The chat template: `--chat-template` first, then tokenizer_config.json's
/// (whose reader also picks up a sibling chat_template.jinja, which takes
/// precedence as in transformers), then a lone chat_template.jinja.
fn template_from_files(
    chat_template: Option<&Path>,
    tokenizer_config: Option<&Path>,
    jinja: Option<&Path>,
) -> Result<Option<ChatTemplate>> {
    Ok(match chat_template {
        Some(path) => Some(ChatTemplate::from_file(path, tokenizer_config)?),
        None => match (tokenizer_config, jinja) {
            (Some(cfg), _) => ChatTemplate::from_tokenizer_config(cfg)?,
            (None, Some(jinja)) => Some(ChatTemplate::from_file(jinja, None)?),
            (None, None) => None,
        },
    })
}

fn generation_config(path: Option<&Path>) -> Result<GenerationConfig> {
    match path {
        Some(p) => GenerationConfig::from_file(p),
        None => Ok(GenerationConfig::default()),
    }
}
