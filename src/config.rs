//! `config.json` and `generation_config.json` → one runtime [`ModelConfig`].
//!
//! Hugging Face configs differ per architecture in names, defaults and in
//! which features they switch on (biases, q/k norms, Gemma's sandwich norms,
//! soft-capping, sliding windows). This module reads the raw JSON once and
//! resolves every such difference into explicit fields, so the decoder in
//! [`crate::models`] never looks at an architecture name. Defaults follow the
//! matching `configuration_*.py` in `transformers`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The architectures taper implements, by their `architectures` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
    /// Qwen3's attention with mixture-of-experts feed-forward layers.
    Qwen3Moe,
    /// Mistral's attention with mixture-of-experts feed-forward layers.
    Mixtral,
    /// Llama with multipliers on the embeddings, attention scores,
    /// residual branches and logits.
    Granite,
    /// Llama without RoPE on some layers (`no_rope_layers`).
    SmolLM3,
    /// Norms after attention and the MLP only, q/k norms over the whole
    /// projections.
    Olmo2,
    /// OLMo's mixture of experts: Llama's norms, q/k norms over the whole
    /// projections.
    Olmoe,
}

impl Architecture {
    /// Every supported class name, for error messages.
    pub const SUPPORTED: [&'static str; 13] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "MixtralForCausalLM",
        "GraniteForCausalLM",
        "SmolLM3ForCausalLM",
        "Olmo2ForCausalLM",
        "OlmoeForCausalLM",
    ];

    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            "Phi3ForCausalLM" => Self::Phi3,
            "Gemma2ForCausalLM" => Self::Gemma2,
            "Gemma3ForCausalLM" => Self::Gemma3,
            "Qwen3MoeForCausalLM" => Self::Qwen3Moe,
            "MixtralForCausalLM" => Self::Mixtral,
            "GraniteForCausalLM" => Self::Granite,
            "SmolLM3ForCausalLM" => Self::SmolLM3,
            "Olmo2ForCausalLM" => Self::Olmo2,
            "OlmoeForCausalLM" => Self::Olmoe,
            _ => return None,
        })
    }

    /// The Hugging Face class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
            Self::Gemma2 => "Gemma2ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
            Self::Qwen3Moe => "Qwen3MoeForCausalLM",
            Self::Mixtral => "MixtralForCausalLM",
            Self::Granite => "GraniteForCausalLM",
            Self::SmolLM3 => "SmolLM3ForCausalLM",
            Self::Olmo2 => "Olmo2ForCausalLM",
            Self::Olmoe => "OlmoeForCausalLM",
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu_pytorch_tanh` / `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// `linear`: positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// YaRN: low frequencies interpolated by `factor`, high ones kept, a
    /// linear ramp between the dimensions `beta_fast` and `beta_slow`
    /// rotations mark over the original context, and cos/sin scaled by
    /// `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        /// Round the ramp's ends to whole dimensions (the default).
        truncate: bool,
    },
    /// Phi-3's `longrope`: one divisor per frequency, `short` for the
    /// positions inside the original context and `long` from
    /// `original_max_position_embeddings` on, and cos/sin scaled by
    /// `attention_factor`. transformers picks the factors per forward pass
    /// from its highest position, so a prompt longer than the original
    /// context is rotated with the long factors throughout; taper picks
    /// them per position (the same as transformers for prompts inside the
    /// original context and for every decode step after it), so a token's
    /// rotation does not depend on how its prompt was chunked or batched.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
    /// One divisor per frequency, given as numbers rather than a formula:
    /// how GGUF files carry Llama 3.1's scaling (llama.cpp's
    /// `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// The mixture-of-experts feed-forward layers of a model: each token's
/// hidden state goes through `top_k` of `num_experts` MLPs, chosen and
/// weighted by a linear router.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token goes through.
    pub top_k: usize,
    /// Rescale the chosen experts' routing weights to sum to 1 (Mixtral
    /// always; Qwen3-MoE's `norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Each expert's intermediate width.
    pub expert_intermediate_size: usize,
    /// Per layer: whether its feed-forward is the expert block (Qwen3-MoE
    /// keeps dense MLPs in `mlp_only_layers` and off `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
    /// How the checkpoint names the block.
    pub naming: MoeNaming,
}

/// Checkpoint names of an expert block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeNaming {
    /// `mlp.gate` and `mlp.experts.{e}.{gate,up,down}_proj` (Qwen-MoE,
    /// OLMoE).
    Qwen,
    /// `block_sparse_moe.gate` and `block_sparse_moe.experts.{e}.{w1,w3,w2}`
    /// (gate, up, down: Mixtral).
    Mixtral,
}

/// Rotary embedding parameters for one group of layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Which attention a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAttention {
    /// Attends to every earlier position.
    Full,
    /// Attends to the last `window` positions, itself included.
    Sliding { window: usize },
}

impl LayerAttention {
    /// The window of a sliding layer; `None` for a full one.
    pub fn window(self) -> Option<usize> {
        match self {
            LayerAttention::Full => None,
            LayerAttention::Sliding { window } => Some(window),
        }
    }
}

/// Everything the decoder needs, resolved from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub activation: Activation,
    /// RoPE for full-attention layers (and all layers unless `rope_local` is set).
    pub rope: Rope,
    /// Gemma 3 uses a different base for its sliding-window layers.
    pub rope_local: Option<Rope>,
    /// One entry per layer.
    pub layer_attention: Vec<LayerAttention>,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm over the whole q and k projections instead (OLMo 2).
    pub qk_norm_full: bool,
    /// Norms before attention and the MLP (`input_layernorm` and
    /// `post_attention_layernorm` / `pre_feedforward_layernorm`); OLMo 2
    /// has only the norms after them.
    pub pre_norms: bool,
    /// Per layer: whether it rotates q and k (SmolLM3 skips every fourth).
    pub rope_layers: Vec<bool>,
    /// Granite: attention and MLP outputs are multiplied by this before
    /// the residual add.
    pub residual_scale: Option<f64>,
    /// Granite: the logits are divided by this.
    pub logit_divisor: Option<f64>,
    /// OLMoE: q, k and v are clamped to `[-clip, clip]` after the norms.
    pub clip_qkv: Option<f64>,
    /// Gemma's RMSNorm multiplies by `1 + w` instead of `w`.
    pub norm_plus_one: bool,
    /// Norms after attention and after the MLP (Gemma's, with its norms
    /// before them too; OLMo 2's alone).
    pub sandwich_norms: bool,
    /// Gemma multiplies embeddings by `sqrt(hidden_size)`.
    pub embedding_scale: Option<f64>,
    /// Multiplier applied to q·k (1/sqrt(head_dim), or Gemma's `query_pre_attn_scalar`).
    pub attn_scale: f64,
    /// Gemma 2: `tanh(s / cap) * cap` on attention scores.
    pub attn_logit_softcap: Option<f64>,
    /// Gemma 2: the same on the final logits.
    pub final_logit_softcap: Option<f64>,
    /// Phi-3 stores q, k and v in one `qkv_proj` matrix.
    pub fused_qkv: bool,
    /// Phi-3 stores gate and up in one `gate_up_proj` matrix.
    pub fused_gate_up: bool,
    /// Mixture-of-experts feed-forward layers (Qwen3-MoE, Mixtral).
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The file this came from, for error messages.
    pub source: PathBuf,
}

impl ModelConfig {
    /// Reads and resolves `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = read_json(path)?;
        Self::from_json(&raw, path)
    }

    /// Resolves an already-parsed `config.json`.
    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let obj = raw.as_object().ok_or_else(|| Error::Json {
            path: path.to_owned(),
            message: "the top level is not a JSON object".into(),
        })?;
        let fields = Fields { obj, path };
        let architecture = fields.architecture()?;
        let arch = architecture;

        let hidden_size = fields.usize("hidden_size")?;
        let num_heads = fields.usize("num_attention_heads")?;
        let num_kv_heads = fields
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(fields.err(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match fields.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(fields.err(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) and head_dim is not given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(fields.err(format!("head_dim ({head_dim}) must be even for RoPE")));
        }
        let num_layers = fields.usize("num_hidden_layers")?;
        let max_position_embeddings = fields.opt_usize("max_position_embeddings")?.unwrap_or(4096);

        let act_name = fields
            .opt_str("hidden_activation")
            .or_else(|| fields.opt_str("hidden_act"))
            .unwrap_or(if arch.is_gemma() {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            });
        let activation = match act_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            other => {
                return Err(fields.err(format!(
                "hidden_act '{other}' is not supported (expected silu, gelu or gelu_pytorch_tanh)"
            )))
            }
        };

        let (rope, rope_local) = fields.rope(arch)?;
        let layer_attention = fields.layer_attention(arch, num_layers)?;

        let default_tie = arch.is_gemma();
        let tie_word_embeddings = fields
            .opt_bool("tie_word_embeddings")?
            .unwrap_or(default_tie);
        let attention_bias = fields.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama
            | Architecture::Granite
            | Architecture::SmolLM3
            | Architecture::Olmo2
            | Architecture::Olmoe
            | Architecture::Qwen3
            | Architecture::Qwen3Moe
            | Architecture::Gemma2
            | Architecture::Gemma3 => (attention_bias, attention_bias),
            _ => (false, false),
        };
        let mlp_bias = matches!(
            arch,
            Architecture::Llama | Architecture::Granite | Architecture::SmolLM3
        ) && fields.opt_bool("mlp_bias")?.unwrap_or(false);
        let granite = |name: &str| -> Result<Option<f64>> {
            Ok(if arch == Architecture::Granite {
                fields.opt_f64(name)?
            } else {
                None
            })
        };

        let attn_scale = if arch.is_gemma() {
            let s = fields
                .opt_f64("query_pre_attn_scalar")?
                .unwrap_or(head_dim as f64);
            if s <= 0.0 {
                return Err(fields.err("query_pre_attn_scalar must be positive".into()));
            }
            s.powf(-0.5)
        } else if let Some(m) = granite("attention_multiplier")? {
            // Granite's scores are q·k times this (in place of 1/√d).
            m
        } else {
            (head_dim as f64).powf(-0.5)
        };
        let rope_layers = match arch {
            // `no_rope_layers[i]` is 1 where layer i *uses* RoPE; by default
            // every `no_rope_layer_interval`-th layer (4) does not.
            Architecture::SmolLM3 => match fields.get("no_rope_layers") {
                Some(Value::Array(flags)) if flags.len() == num_layers => flags
                    .iter()
                    .map(|f| match f.as_u64() {
                        Some(1) => Ok(true),
                        Some(0) => Ok(false),
                        _ => Err(fields.err(format!("no_rope_layers holds {f}, not 0 or 1"))),
                    })
                    .collect::<Result<Vec<_>>>()?,
                Some(other) => {
                    return Err(fields.err(format!(
                        "no_rope_layers must list 0 or 1 for each of the {num_layers} layers, not {other}"
                    )))
                }
                None => {
                    let every = fields.opt_usize("no_rope_layer_interval")?.unwrap_or(4).max(1);
                    (0..num_layers).map(|i| (i + 1) % every != 0).collect()
                }
            },
            _ => vec![true; num_layers],
        };
        let softcap =
            |name: &str| -> Result<Option<f64>> { Ok(fields.opt_f64(name)?.filter(|c| *c > 0.0)) };
        let (attn_logit_softcap, final_logit_softcap) = match arch {
            Architecture::Gemma2 | Architecture::Gemma3 => (
                softcap("attn_logit_softcapping")?,
                softcap("final_logit_softcapping")?,
            ),
            _ => (None, None),
        };

        let eps_default = if arch.is_gemma() { 1e-6 } else { 1e-5 };
        let rms_norm_eps = fields.opt_f64("rms_norm_eps")?.unwrap_or(eps_default);

        let config = ModelConfig {
            architecture,
            vocab_size: fields.usize("vocab_size")?,
            hidden_size,
            intermediate_size: fields.usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            activation,
            rope,
            rope_local,
            layer_attention,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: matches!(
                arch,
                Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3
            ),
            qk_norm_full: matches!(arch, Architecture::Olmo2 | Architecture::Olmoe),
            pre_norms: arch != Architecture::Olmo2,
            rope_layers,
            residual_scale: granite("residual_multiplier")?,
            logit_divisor: granite("logits_scaling")?,
            clip_qkv: match arch {
                Architecture::Olmoe => fields.opt_f64("clip_qkv")?,
                _ => None,
            },
            norm_plus_one: arch.is_gemma(),
            sandwich_norms: arch.is_gemma() || arch == Architecture::Olmo2,
            embedding_scale: match granite("embedding_multiplier")? {
                Some(m) => Some(m),
                None => arch.is_gemma().then(|| (hidden_size as f64).sqrt()),
            },
            attn_scale,
            attn_logit_softcap,
            final_logit_softcap,
            fused_qkv: arch == Architecture::Phi3,
            fused_gate_up: arch == Architecture::Phi3,
            moe: fields.moe(arch, num_layers)?,
            bos_token_id: fields
                .opt_token_ids("bos_token_id")?
                .and_then(|v| v.first().copied()),
            eos_token_ids: fields.opt_token_ids("eos_token_id")?.unwrap_or_default(),
            source: path.to_owned(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Refuses values a model loads with but cannot compute with (NaN or
    /// infinite activations on every request), or that would reserve
    /// absurd memory, naming the field. `from_json` calls it; a
    /// `ModelConfig` built another way (GGUF metadata) should too.
    pub fn validate(&self) -> Result<()> {
        let err = |message: String| Error::Config {
            path: self.source.clone(),
            message,
        };
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(err(format!("{name} must be at least 1, found 0")));
            }
        }
        if !(1..=MAX_POSITION_EMBEDDINGS).contains(&self.max_position_embeddings) {
            return Err(err(format!(
                "max_position_embeddings must be in [1, {MAX_POSITION_EMBEDDINGS}], found {}",
                self.max_position_embeddings
            )));
        }
        // RMSNorm divides by sqrt(mean(x²) + eps): eps <= 0 gives NaN on a
        // zero row and inf where the mean underflows.
        positive("rms_norm_eps", self.rms_norm_eps).map_err(err)?;
        for (name, rope) in [
            ("rope_theta", Some(&self.rope)),
            ("rope_local_base_freq", self.rope_local.as_ref()),
        ] {
            let Some(rope) = rope else { continue };
            // The inverse frequencies are theta^(-2i/d): theta 0 gives inf.
            positive(name, rope.theta).map_err(err)?;
            match &rope.scaling {
                RopeScaling::None => {}
                RopeScaling::Linear { factor } => {
                    positive("rope_scaling.factor", *factor).map_err(err)?
                }
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => {
                    positive("rope_scaling.factor", *factor).map_err(err)?;
                    positive("rope_scaling.low_freq_factor", *low_freq_factor).map_err(err)?;
                    positive("rope_scaling.high_freq_factor", *high_freq_factor).map_err(err)?;
                    positive(
                        "rope_scaling.original_max_position_embeddings",
                        *original_max_position_embeddings,
                    )
                    .map_err(err)?;
                    // Llama 3's smoothing divides by their difference.
                    if high_freq_factor <= low_freq_factor {
                        return Err(err(format!(
                            "rope_scaling.high_freq_factor ({high_freq_factor}) must be greater than low_freq_factor ({low_freq_factor})"
                        )));
                    }
                }
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings,
                    beta_fast,
                    beta_slow,
                    attention_factor,
                    ..
                } => {
                    positive("rope_scaling.factor", *factor).map_err(err)?;
                    positive(
                        "rope_scaling.original_max_position_embeddings",
                        *original_max_position_embeddings,
                    )
                    .map_err(err)?;
                    positive("rope_scaling.beta_fast", *beta_fast).map_err(err)?;
                    positive("rope_scaling.beta_slow", *beta_slow).map_err(err)?;
                    positive("rope_scaling.attention_factor", *attention_factor).map_err(err)?;
                }
                RopeScaling::LongRope {
                    short,
                    long,
                    attention_factor,
                    ..
                } => {
                    positive("rope_scaling.attention_factor", *attention_factor).map_err(err)?;
                    let half = self.head_dim / 2;
                    for (name, f) in [("short_factor", short), ("long_factor", long)] {
                        if f.len() != half {
                            return Err(err(format!(
                                "rope_scaling.{name} has {} entries but the rotary dimension needs {half} (head_dim / 2)",
                                f.len()
                            )));
                        }
                    }
                }
                RopeScaling::Factors(factors) => {
                    if let Some(f) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                        return Err(err(format!(
                            "the RoPE frequency factors must be positive finite numbers, found {f}"
                        )));
                    }
                }
            }
        }
        positive(
            "the attention scale (query_pre_attn_scalar)",
            self.attn_scale,
        )
        .map_err(err)?;
        for (name, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcap),
            ("final_logit_softcapping", self.final_logit_softcap),
        ] {
            if let Some(cap) = cap {
                positive(name, cap).map_err(err)?;
            }
        }
        if let Some(scale) = self.embedding_scale {
            positive("the embedding scale (hidden_size)", scale).map_err(err)?;
        }
        Ok(())
    }

    /// The rope parameters a layer uses.
    pub fn rope_for_layer(&self, layer: usize) -> &Rope {
        match (self.layer_attention.get(layer), &self.rope_local) {
            (Some(LayerAttention::Sliding { .. }), Some(local)) => local,
            _ => &self.rope,
        }
    }
}

/// The largest `max_position_embeddings` accepted: 2^24 (16.7M) positions,
/// above the longest contexts published (10M). A larger value is a broken
/// config, and the default KV budget is sized from it.
pub const MAX_POSITION_EMBEDDINGS: usize = 1 << 24;

/// `Ok` when `value` is a positive finite number; else the message naming
/// `name`.
fn positive(name: &str, value: f64) -> std::result::Result<(), String> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "{name} must be a positive finite number, found {value}"
        ))
    }
}

/// Sampling defaults and stop tokens from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = read_json(path)?;
        let obj = raw.as_object().ok_or_else(|| Error::Json {
            path: path.to_owned(),
            message: "the top level is not a JSON object".into(),
        })?;
        let f = Fields { obj, path };
        Ok(GenerationConfig {
            eos_token_ids: f.opt_token_ids("eos_token_id")?.unwrap_or_default(),
            bos_token_id: f
                .opt_token_ids("bos_token_id")?
                .and_then(|v| v.first().copied()),
            do_sample: f.opt_bool("do_sample")?,
            temperature: f.opt_f64("temperature")?,
            top_p: f.opt_f64("top_p")?,
            top_k: f.opt_usize("top_k")?,
            min_p: f.opt_f64("min_p")?,
            repetition_penalty: f.opt_f64("repetition_penalty")?,
            max_new_tokens: f.opt_usize("max_new_tokens")?,
        })
    }
}

/// Reads a JSON file, naming it in any error.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Typed access to a config object, with errors naming the file and field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, message: String) -> Error {
        Error::Config {
            path: self.path.to_owned(),
            message,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("required field '{key}' is missing")))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(format!(
                    "field '{key}' must be a non-negative integer, found {v}"
                ))
            }),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("field '{key}' must be a number, found {v}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("field '{key}' must be true or false, found {v}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// A token id given as a number or a list of numbers.
    fn opt_token_ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let bad = || {
            self.err(format!(
                "field '{key}' must be a token id or a list of token ids"
            ))
        };
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(bad)
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(|n| Some(vec![n]))
                .ok_or_else(bad),
        }
    }

    fn architecture(&self) -> Result<Architecture> {
        let names: Vec<&str> = match self.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if let Some(arch) = names.iter().find_map(|n| Architecture::from_class(n)) {
            return Ok(arch);
        }
        // Some configs carry only `model_type`.
        let from_type = match self.opt_str("model_type") {
            Some("llama") => Some(Architecture::Llama),
            Some("mistral") => Some(Architecture::Mistral),
            Some("qwen2") => Some(Architecture::Qwen2),
            Some("qwen3") => Some(Architecture::Qwen3),
            Some("phi3") => Some(Architecture::Phi3),
            Some("gemma2") => Some(Architecture::Gemma2),
            Some("gemma3_text") => Some(Architecture::Gemma3),
            _ => None,
        };
        if names.is_empty() {
            if let Some(arch) = from_type {
                return Ok(arch);
            }
        }
        let found = if names.is_empty() {
            format!(
                "model_type {}",
                self.opt_str("model_type")
                    .unwrap_or("(none and no 'architectures')")
            )
        } else {
            names.join(", ")
        };
        Err(Error::UnsupportedArchitecture {
            path: self.path.to_owned(),
            found,
            supported: Architecture::SUPPORTED.join(", "),
        })
    }

    /// Reads RoPE parameters from either the classic keys (`rope_theta`,
    /// `rope_scaling`) or transformers 5's `rope_parameters`, which may be
    /// keyed by layer type (`full_attention`, `sliding_attention`).
    /// The expert layers of a mixture-of-experts architecture (`None` for
    /// a dense one), with each family's defaults as `transformers` has them.
    fn moe(&self, arch: Architecture, num_layers: usize) -> Result<Option<MoeConfig>> {
        let (num_experts, expert_intermediate_size, norm_topk_prob, naming) = match arch {
            Architecture::Qwen3Moe => (
                // The Hub's configs say `num_experts`; transformers 5 writes
                // `num_local_experts`.
                match self.opt_usize("num_experts")? {
                    Some(n) => n,
                    None => self.usize("num_local_experts")?,
                },
                self.usize("moe_intermediate_size")?,
                self.opt_bool("norm_topk_prob")?.unwrap_or(false),
                MoeNaming::Qwen,
            ),
            Architecture::Mixtral => (
                self.opt_usize("num_local_experts")?.unwrap_or(8),
                self.usize("intermediate_size")?,
                true,
                MoeNaming::Mixtral,
            ),
            Architecture::Olmoe => (
                self.opt_usize("num_experts")?.unwrap_or(64),
                self.usize("intermediate_size")?,
                self.opt_bool("norm_topk_prob")?.unwrap_or(false),
                MoeNaming::Qwen,
            ),
            _ => return Ok(None),
        };
        let top_k = self.opt_usize("num_experts_per_tok")?.unwrap_or(2);
        if num_experts == 0 || top_k == 0 || top_k > num_experts {
            return Err(self.err(format!(
                "num_experts_per_tok ({top_k}) must be between 1 and the number of experts ({num_experts})"
            )));
        }
        let sparse_layers = match arch {
            Architecture::Qwen3Moe => {
                let step = self.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(self.err("decoder_sparse_step must be at least 1".into()));
                }
                let dense: Vec<usize> = match self.get("mlp_only_layers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                        self.err(format!(
                            "mlp_only_layers must be a list of layer indices, not {v}"
                        ))
                    })?,
                };
                (0..num_layers)
                    .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
                    .collect()
            }
            _ => vec![true; num_layers],
        };
        Ok(Some(MoeConfig {
            num_experts,
            top_k,
            norm_topk_prob,
            expert_intermediate_size,
            sparse_layers,
            naming,
        }))
    }

    fn rope(&self, arch: Architecture) -> Result<(Rope, Option<Rope>)> {
        let default_theta = 10_000.0;
        let params = self.get("rope_parameters").and_then(Value::as_object);
        let (global, local) = match params {
            Some(p) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
                let g = p.get("full_attention").and_then(Value::as_object);
                let l = p.get("sliding_attention").and_then(Value::as_object);
                (g, l)
            }
            Some(p) => (Some(p), None),
            None => (None, None),
        };
        let classic_theta = self.opt_f64("rope_theta")?;
        let classic_scaling = self.get("rope_scaling").and_then(Value::as_object);
        let global_rope = self.parse_rope(
            global,
            classic_theta.unwrap_or(default_theta),
            classic_scaling,
        )?;
        let local_rope = if arch == Architecture::Gemma3 {
            let local_theta = self
                .opt_f64("rope_local_base_freq")?
                .unwrap_or(default_theta);
            // Gemma 3's sliding layers never use the long-context scaling.
            Some(self.parse_rope(local, local_theta, None)?)
        } else {
            None
        };
        Ok((global_rope, local_rope))
    }

    fn parse_rope(
        &self,
        params: Option<&Map<String, Value>>,
        fallback_theta: f64,
        fallback_scaling: Option<&Map<String, Value>>,
    ) -> Result<Rope> {
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(fallback_theta);
        let scaling_obj = params.or(fallback_scaling);
        let scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let num = |k: &str| -> Result<f64> {
                    s.get(k).and_then(Value::as_f64).ok_or_else(|| {
                        self.err(format!("rope scaling '{kind}' needs a numeric '{k}'"))
                    })
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: num("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    },
                    "yarn" => {
                        let factor = num("factor")?;
                        let opt = |k: &str| s.get(k).and_then(Value::as_f64);
                        let original = match opt("original_max_position_embeddings") {
                            Some(o) => o,
                            // As `from_json` defaults it.
                            None => {
                                self.opt_usize("max_position_embeddings")?.unwrap_or(4096) as f64
                            }
                        };
                        // transformers' get_mscale: 0.1·m·ln(factor) + 1.
                        let mscale = |m: f64| {
                            if factor <= 1.0 {
                                1.0
                            } else {
                                0.1 * m * factor.ln() + 1.0
                            }
                        };
                        let attention_factor = match (
                            opt("attention_factor"),
                            opt("mscale").filter(|m| *m != 0.0),
                            opt("mscale_all_dim").filter(|m| *m != 0.0),
                        ) {
                            (Some(a), _, _) => a,
                            (None, Some(m), Some(all)) => mscale(m) / mscale(all),
                            _ => mscale(1.0),
                        };
                        RopeScaling::Yarn {
                            factor,
                            original_max_position_embeddings: original,
                            beta_fast: opt("beta_fast").filter(|b| *b != 0.0).unwrap_or(32.0),
                            beta_slow: opt("beta_slow").filter(|b| *b != 0.0).unwrap_or(1.0),
                            attention_factor,
                            truncate: s.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                        }
                    }
                    "longrope" | "su" => {
                        let factors = |k: &str| -> Result<Vec<f32>> {
                            s.get(k)
                                .and_then(Value::as_array)
                                .and_then(|a| {
                                    a.iter().map(|v| v.as_f64().map(|f| f as f32)).collect()
                                })
                                .filter(|f: &Vec<f32>| f.iter().all(|x| x.is_finite() && *x > 0.0))
                                .ok_or_else(|| {
                                    self.err(format!(
                                        "rope scaling 'longrope' needs '{k}', a list of positive numbers"
                                    ))
                                })
                        };
                        let (short, long) = (factors("short_factor")?, factors("long_factor")?);
                        let original = match s
                            .get("original_max_position_embeddings")
                            .and_then(Value::as_u64)
                        {
                            Some(o) => o as usize,
                            None => self
                                .opt_usize("original_max_position_embeddings")?
                                .ok_or_else(|| {
                                    self.err(
                                        "rope scaling 'longrope' needs 'original_max_position_embeddings'"
                                            .into(),
                                    )
                                })?,
                        };
                        let max = self.opt_usize("max_position_embeddings")?.unwrap_or(original);
                        // transformers' _compute_longrope_parameters.
                        let factor = s
                            .get("factor")
                            .and_then(Value::as_f64)
                            .unwrap_or(max as f64 / original.max(1) as f64);
                        let attention_factor = match s.get("attention_factor").and_then(Value::as_f64) {
                            Some(a) => a,
                            None if factor <= 1.0 => 1.0,
                            None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                        };
                        RopeScaling::LongRope {
                            short,
                            long,
                            original_max_position_embeddings: original,
                            attention_factor,
                        }
                    }
                    other => {
                        return Err(self.err(format!(
                            "rope scaling type '{other}' is not supported (supported: default, linear, llama3, yarn, longrope)"
                        )))
                    }
                }
            }
        };
        Ok(Rope { theta, scaling })
    }

    /// Which layers use a sliding window, following each architecture's
    /// `transformers` defaults when `layer_types` is absent.
    fn layer_attention(
        &self,
        arch: Architecture,
        num_layers: usize,
    ) -> Result<Vec<LayerAttention>> {
        let window = self.opt_usize("sliding_window")?;
        let sliding = |w: Option<usize>| -> Result<LayerAttention> {
            match w {
                Some(0) | None => Err(self.err(
                    "a layer uses sliding attention but 'sliding_window' is missing or 0".into(),
                )),
                Some(window) => Ok(LayerAttention::Sliding { window }),
            }
        };
        if let Some(Value::Array(types)) = self.get("layer_types") {
            if types.len() != num_layers {
                return Err(self.err(format!(
                    "layer_types has {} entries but num_hidden_layers is {num_layers}",
                    types.len()
                )));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(LayerAttention::Full),
                    Some("sliding_attention") => sliding(window),
                    _ => Err(self.err(format!("unknown entry {t} in layer_types"))),
                })
                .collect();
        }
        let all_full = vec![LayerAttention::Full; num_layers];
        match arch {
            Architecture::Mistral | Architecture::Phi3 | Architecture::Mixtral => match window {
                Some(w) if w > 0 => Ok(vec![LayerAttention::Sliding { window: w }; num_layers]),
                _ => Ok(all_full),
            },
            Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Qwen3Moe
            | Architecture::SmolLM3 => {
                if self.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    let max_window_layers =
                        self.opt_usize("max_window_layers")?.unwrap_or(num_layers);
                    (0..num_layers)
                        .map(|i| {
                            if i >= max_window_layers {
                                sliding(window)
                            } else {
                                Ok(LayerAttention::Full)
                            }
                        })
                        .collect()
                } else {
                    Ok(all_full)
                }
            }
            Architecture::Gemma2 => (0..num_layers)
                .map(|i| {
                    if i % 2 == 0 {
                        sliding(window)
                    } else {
                        Ok(LayerAttention::Full)
                    }
                })
                .collect(),
            Architecture::Gemma3 => {
                let pattern = self
                    .opt_usize("sliding_window_pattern")?
                    .unwrap_or(6)
                    .max(1);
                (0..num_layers)
                    .map(|i| {
                        if (i + 1) % pattern != 0 {
                            sliding(window)
                        } else {
                            Ok(LayerAttention::Full)
                        }
                    })
                    .collect()
            }
            Architecture::Llama
            | Architecture::Granite
            | Architecture::Olmo2
            | Architecture::Olmoe => Ok(all_full),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    fn base(arch: &str) -> Value {
        json!({
            "architectures": [arch],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
        })
    }

    #[test]
    fn unknown_architecture_is_named_with_the_supported_list() {
        let err = parse(base("FalconForCausalLM")).unwrap_err().to_string();
        assert!(err.contains("FalconForCausalLM"), "{err}");
        assert!(err.contains("Qwen3ForCausalLM"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = base("LlamaForCausalLM");
        v.as_object_mut().unwrap().remove("vocab_size");
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("'vocab_size'"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama_does_not() -> Result<()> {
        assert!(parse(base("Qwen2ForCausalLM"))?.qkv_bias);
        assert!(!parse(base("LlamaForCausalLM"))?.qkv_bias);
        Ok(())
    }

    #[test]
    fn expert_layers_follow_each_familys_fields() -> Result<()> {
        let mut v = base("Qwen3MoeForCausalLM");
        v["num_experts"] = json!(8);
        v["num_experts_per_tok"] = json!(2);
        v["moe_intermediate_size"] = json!(32);
        v["decoder_sparse_step"] = json!(2);
        v["mlp_only_layers"] = json!([3]);
        let c = parse(v.clone())?;
        let moe = c.moe.expect("expert layers");
        assert_eq!(
            (moe.num_experts, moe.top_k, moe.expert_intermediate_size),
            (8, 2, 32)
        );
        assert!(!moe.norm_topk_prob, "Qwen3-MoE's default");
        // Every second layer is sparse, except layer 3 (mlp_only_layers).
        assert_eq!(moe.sparse_layers, vec![false, true, false, false]);
        assert!(c.qk_norm);
        // transformers 5 writes num_local_experts instead.
        v.as_object_mut().expect("object").remove("num_experts");
        v["num_local_experts"] = json!(6);
        assert_eq!(parse(v.clone())?.moe.expect("moe").num_experts, 6);
        v["num_experts_per_tok"] = json!(7);
        let err = parse(v).expect_err("top-k above the experts").to_string();
        assert!(err.contains("num_experts_per_tok (7)"), "{err}");

        let mut v = base("MixtralForCausalLM");
        v["num_local_experts"] = json!(4);
        let moe = parse(v)?.moe.expect("expert layers");
        assert_eq!((moe.num_experts, moe.top_k), (4, 2));
        assert!(moe.norm_topk_prob && moe.sparse_layers.iter().all(|&s| s));
        assert_eq!(
            moe.expert_intermediate_size, 128,
            "Mixtral's intermediate_size"
        );
        assert!(parse(base("LlamaForCausalLM"))?.moe.is_none());

        let mut v = base("OlmoeForCausalLM");
        v["num_experts"] = json!(64);
        v["num_experts_per_tok"] = json!(8);
        v["clip_qkv"] = json!(2.5);
        let c = parse(v)?;
        let moe = c.moe.expect("expert layers");
        assert_eq!((moe.num_experts, moe.top_k), (64, 8));
        assert!(!moe.norm_topk_prob && moe.naming == MoeNaming::Qwen);
        assert!(c.qk_norm_full && c.pre_norms && !c.sandwich_norms);
        assert_eq!(c.clip_qkv, Some(2.5));
        Ok(())
    }

    #[test]
    fn granite_smollm3_and_olmo2_switches() -> Result<()> {
        let mut v = base("GraniteForCausalLM");
        v["embedding_multiplier"] = json!(12.0);
        v["attention_multiplier"] = json!(0.0078125);
        v["residual_multiplier"] = json!(0.22);
        v["logits_scaling"] = json!(8.0);
        let c = parse(v)?;
        assert_eq!(c.embedding_scale, Some(12.0));
        assert_eq!(c.attn_scale, 0.0078125, "replaces 1/sqrt(head_dim)");
        assert_eq!((c.residual_scale, c.logit_divisor), (Some(0.22), Some(8.0)));
        // Llama reads none of them.
        let mut v = base("LlamaForCausalLM");
        v["residual_multiplier"] = json!(0.22);
        let c = parse(v)?;
        assert_eq!((c.residual_scale, c.embedding_scale), (None, None));

        let mut v = base("SmolLM3ForCausalLM");
        assert_eq!(parse(v.clone())?.rope_layers, vec![true, true, true, false]);
        v["no_rope_layers"] = json!([1, 0, 1, 1]);
        assert_eq!(parse(v.clone())?.rope_layers, vec![true, false, true, true]);
        v["no_rope_layers"] = json!([1, 0]);
        let err = parse(v).expect_err("one flag per layer").to_string();
        assert!(err.contains("no_rope_layers"), "{err}");

        let c = parse(base("Olmo2ForCausalLM"))?;
        assert!(c.qk_norm_full && !c.qk_norm && !c.pre_norms && c.sandwich_norms);
        assert!(c.rope_layers.iter().all(|&r| r));
        Ok(())
    }

    #[test]
    fn gemma2_alternates_sliding_and_full_layers() -> Result<()> {
        let mut v = base("Gemma2ForCausalLM");
        v["sliding_window"] = json!(8);
        v["query_pre_attn_scalar"] = json!(256);
        let c = parse(v)?;
        assert_eq!(c.layer_attention[0], LayerAttention::Sliding { window: 8 });
        assert_eq!(c.layer_attention[1], LayerAttention::Full);
        assert!((c.attn_scale - 1.0 / 16.0).abs() < 1e-12);
        assert!(c.tie_word_embeddings && c.norm_plus_one && c.sandwich_norms);
        Ok(())
    }

    #[test]
    fn rope_parameters_by_layer_type_are_read() -> Result<()> {
        let mut v = base("Gemma3ForCausalLM");
        v["sliding_window"] = json!(4);
        v["layer_types"] = json!([
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention"
        ]);
        v["rope_parameters"] = json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}
        });
        let c = parse(v)?;
        assert_eq!(c.rope.theta, 1_000_000.0);
        assert_eq!(c.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(c.rope_for_layer(0).theta, 10_000.0);
        assert_eq!(c.rope_for_layer(2).theta, 1_000_000.0);
        Ok(())
    }

    #[test]
    fn unsupported_rope_type_is_an_error() {
        let mut v = base("LlamaForCausalLM");
        v["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 4.0});
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("dynamic"), "{err}");
    }

    /// Phi-3.5-mini's form: `longrope` under `rope_scaling` with the
    /// original context at the top level; the attention factor from the
    /// ratio of the two contexts; factor lists of the wrong length named.
    #[test]
    fn longrope_reads_both_factor_lists_and_the_original_context() -> Result<()> {
        let mut v = base("Phi3ForCausalLM");
        let half = v["hidden_size"].as_u64().unwrap_or(0) / v["num_attention_heads"].as_u64().unwrap_or(1) / 2;
        let ones: Vec<f64> = (0..half).map(|_| 1.0).collect();
        let twos: Vec<f64> = (0..half).map(|_| 2.0).collect();
        v["max_position_embeddings"] = json!(131072);
        v["original_max_position_embeddings"] = json!(4096);
        v["rope_scaling"] = json!({"type": "longrope", "short_factor": ones, "long_factor": twos});
        let RopeScaling::LongRope {
            short,
            long,
            original_max_position_embeddings,
            attention_factor,
        } = parse(v.clone())?.rope.scaling
        else {
            panic!("longrope");
        };
        assert_eq!((short.len(), long[0]), (half as usize, 2.0));
        assert_eq!(original_max_position_embeddings, 4096);
        let want = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
        assert!((attention_factor - want).abs() < 1e-12, "{attention_factor}");
        v["rope_scaling"]["long_factor"] = json!([2.0]);
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("long_factor has 1 entries"), "{err}");
        Ok(())
    }

    #[test]
    fn yarn_takes_transformers_defaults() -> Result<()> {
        let mut v = base("Qwen2ForCausalLM");
        v["max_position_embeddings"] = json!(32768);
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        let RopeScaling::Yarn {
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
            ..
        } = parse(v.clone())?.rope.scaling
        else {
            panic!("yarn");
        };
        assert_eq!(original_max_position_embeddings, 32768.0);
        assert_eq!((beta_fast, beta_slow, truncate), (32.0, 1.0, true));
        assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        // DeepSeek's mscale pair.
        v["rope_scaling"] = json!({"type": "yarn", "factor": 40.0, "mscale": 1.0,
                                   "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096});
        let RopeScaling::Yarn {
            attention_factor, ..
        } = parse(v)?.rope.scaling
        else {
            panic!("yarn");
        };
        assert_eq!(attention_factor, 1.0);
        Ok(())
    }

    #[test]
    fn values_a_model_cannot_compute_with_are_named() {
        let cases = [
            (
                "rms_norm_eps",
                json!(-1),
                "rms_norm_eps must be a positive finite number, found -1",
            ),
            ("rms_norm_eps", json!(0), "rms_norm_eps"),
            (
                "rope_theta",
                json!(0),
                "rope_theta must be a positive finite number, found 0",
            ),
            ("rope_theta", json!(-10000.0), "rope_theta"),
            (
                "max_position_embeddings",
                json!(0),
                "max_position_embeddings must be in [1, 16777216], found 0",
            ),
            (
                "max_position_embeddings",
                json!(1_000_000_000_000_000u64),
                "max_position_embeddings",
            ),
            ("vocab_size", json!(0), "vocab_size must be at least 1"),
            ("intermediate_size", json!(0), "intermediate_size"),
        ];
        for (field, value, want) in cases {
            let mut v = base("LlamaForCausalLM");
            v[field] = value.clone();
            match parse(v) {
                Err(e @ Error::Config { .. }) => {
                    assert!(e.to_string().contains(want), "{field}={value}: {e}")
                }
                other => panic!("{field}={value}: expected a config error, got {other:?}"),
            }
        }
        let mut v = base("LlamaForCausalLM");
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 0.0});
        let e = parse(v).expect_err("factor 0");
        assert!(e.to_string().contains("rope_scaling.factor"), "{e}");
        let mut v = base("Gemma3ForCausalLM");
        v["sliding_window"] = json!(16);
        v["rope_local_base_freq"] = json!(0);
        let e = parse(v).expect_err("local theta 0");
        assert!(e.to_string().contains("rope_local_base_freq"), "{e}");
        // The defaults of every architecture pass.
        for arch in ["LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"] {
            parse(base(arch)).expect(arch);
        }
    }

    #[test]
    fn bad_head_counts_are_rejected() {
        let mut v = base("LlamaForCausalLM");
        v["num_key_value_heads"] = json!(3);
        assert!(parse(v).is_err());
    }
}
