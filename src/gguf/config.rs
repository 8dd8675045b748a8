//! GGUF metadata → the runtime [`ModelConfig`].
//!
//! llama.cpp's converter writes a model's hyper-parameters under
//! `{arch}.*` keys (`llama.block_count`, `qwen2.attention.head_count_kv`,
//! ...). Where a key is absent, the defaults are llama.cpp's own
//! (`src/models/<arch>.cpp`, `load_arch_hparams`), since it is the runtime
//! these files are written for: Gemma 2's alternating windows and soft-caps
//! of 50 and 30, Gemma 3's five sliding layers in six, and the attention
//! scale llama.cpp derives for Gemma (the converter drops
//! `query_pre_attn_scalar`). Which optional tensors exist (biases, a
//! separate `output.weight`) is read from the tensor index, as llama.cpp
//! does.

use crate::config::{
    Activation, Architecture, LayerAttention, ModelConfig, MoeConfig, MoeNaming, Rope, RopeScaling,
};
use crate::gguf::GgufFile;
use crate::{Error, Result};

/// The `general.architecture` values taper loads.
pub const SUPPORTED: [&str; 7] = [
    "llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "qwen3moe",
];

fn architecture(name: &str) -> Option<Architecture> {
    Some(match name {
        // Mistral's models convert to `llama` too.
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "phi3" => Architecture::Phi3,
        "gemma2" => Architecture::Gemma2,
        "gemma3" => Architecture::Gemma3,
        "qwen3moe" => Architecture::Qwen3Moe,
        _ => return None,
    })
}

/// Resolves a GGUF file's metadata into a [`ModelConfig`].
pub fn model_config(f: &GgufFile) -> Result<ModelConfig> {
    let arch_name = f
        .str("general.architecture")?
        .ok_or_else(|| f.err("required metadata 'general.architecture' is missing".into()))?;
    let arch = architecture(arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
        path: f.path().to_path_buf(),
        found: arch_name.to_string(),
        supported: format!("{} (GGUF general.architecture)", SUPPORTED.join(", ")),
    })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    // Mixtral converts to `llama` with experts.
    let experts = f.usize(&key("expert_count"))?.unwrap_or(0);
    let arch = match arch {
        Architecture::Llama if experts > 0 => Architecture::Mixtral,
        other => other,
    };
    let gemma = matches!(arch, Architecture::Gemma2 | Architecture::Gemma3);

    let hidden_size = f.require_usize(&key("embedding_length"))?;
    let num_layers = f.require_usize(&key("block_count"))?;
    let ff_key = key("feed_forward_length");
    if matches!(
        f.get(&ff_key),
        Some(candle_core::quantized::gguf_file::Value::Array(_))
    ) {
        return Err(f.err(format!(
            "'{ff_key}' differs per layer, which taper does not support"
        )));
    }
    let intermediate_size = f.require_usize(&ff_key)?;
    let num_heads = f.require_usize(&key("attention.head_count"))?;
    let num_kv_heads = f
        .usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(f.err(format!(
            "attention.head_count ({num_heads}) must be a positive multiple of attention.head_count_kv ({num_kv_heads})"
        )));
    }
    let head_dim = match f.usize(&key("attention.key_length"))? {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(f.err(format!(
                "embedding_length ({hidden_size}) is not divisible by attention.head_count ({num_heads}) and attention.key_length is not given"
            )))
        }
    };
    if let Some(v) = f.usize(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(f.err(format!(
                "attention.value_length ({v}) differs from attention.key_length ({head_dim}), which taper does not support"
            )));
        }
    }
    if head_dim % 2 != 0 {
        return Err(f.err(format!("head size ({head_dim}) must be even for RoPE")));
    }
    if let Some(d) = f.usize(&key("rope.dimension_count"))? {
        if d != head_dim {
            return Err(f.err(format!(
                "rope.dimension_count ({d}) is not the head size ({head_dim}): partial rotary embeddings are not supported"
            )));
        }
    }

    // The embedding table's rows are the vocabulary, whatever the tokenizer
    // lists (converters pad it).
    let embd = f
        .tensor("token_embd.weight")
        .ok_or_else(|| f.err("tensor 'token_embd.weight' is missing".into()))?;
    let vocab_size = match embd.shape.as_slice() {
        [rows, cols] if *cols == hidden_size => *rows,
        other => {
            return Err(f.err(format!(
                "token_embd.weight has shape {other:?}, expected [vocab, {hidden_size}]"
            )))
        }
    };

    let (rope, rope_local) = rope(f, arch, &key, head_dim)?;
    let layer_attention = layer_attention(f, arch, &key, num_layers)?;

    let attn_scale = match f.f64(&key("attention.scale"))? {
        Some(s) if s > 0.0 => s,
        Some(s) => return Err(f.err(format!("attention.scale ({s}) must be positive"))),
        // llama.cpp's rule for Gemma: 1/sqrt(hidden/heads) for the 27B
        // models (recognised by their layer count), else 1/sqrt(head size),
        // which is what their `query_pre_attn_scalar` says.
        None if (arch == Architecture::Gemma2 && num_layers == 46)
            || (arch == Architecture::Gemma3 && num_layers == 62) =>
        {
            ((hidden_size / num_heads) as f64).powf(-0.5)
        }
        None => (head_dim as f64).powf(-0.5),
    };
    let softcap = |k: &str, default: Option<f64>| -> Result<Option<f64>> {
        Ok(f.f64(&key(k))?.or(default).filter(|c| *c > 0.0))
    };
    let (attn_logit_softcap, final_logit_softcap) = match arch {
        Architecture::Gemma2 => (
            softcap("attn_logit_softcapping", Some(50.0))?,
            softcap("final_logit_softcapping", Some(30.0))?,
        ),
        Architecture::Gemma3 => (None, softcap("final_logit_softcapping", None)?),
        _ => (None, None),
    };
    let eps_default = if gemma { 1e-6 } else { 1e-5 };
    let rms_norm_eps = f
        .f64(&key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(eps_default);

    let has = |name: &str| f.tensor(name).is_some();
    let mut eos_token_ids = Vec::new();
    for k in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = f.token_id(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }

    let config = ModelConfig {
        architecture: arch,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        max_position_embeddings: f.usize(&key("context_length"))?.unwrap_or(4096),
        rms_norm_eps,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        rope,
        rope_local,
        layer_attention,
        // A tied model has no separate output matrix.
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        qk_norm: matches!(
            arch,
            Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3
        ),
        qk_norm_full: false,
        pre_norms: true,
        rope_layers: vec![true; num_layers],
        residual_scale: None,
        logit_divisor: None,
        norm_plus_one: gemma,
        sandwich_norms: gemma,
        embedding_scale: gemma.then(|| (hidden_size as f64).sqrt()),
        attn_scale,
        attn_logit_softcap,
        final_logit_softcap,
        fused_qkv: arch == Architecture::Phi3,
        fused_gate_up: arch == Architecture::Phi3,
        moe: moe(f, arch, &key, num_layers, intermediate_size)?,
        bos_token_id: f.token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        source: f.path().to_path_buf(),
    };
    // The metadata can hold the same impossible values as a config.json.
    config.validate()?;
    Ok(config)
}

/// The global RoPE and, for Gemma 3, its sliding layers' own.
fn rope(
    f: &GgufFile,
    arch: Architecture,
    key: &dyn Fn(&str) -> String,
    head_dim: usize,
) -> Result<(Rope, Option<Rope>)> {
    let theta = f.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let factor = f.f64(&key("rope.scaling.factor"))?;
    let mut scaling = match f.str(&key("rope.scaling.type"))? {
        None | Some("none") => match f.f64(&key("rope.scale_linear"))? {
            // The key older converters wrote for linear scaling.
            Some(factor) if factor != 1.0 => RopeScaling::Linear { factor },
            _ => RopeScaling::None,
        },
        Some("linear") => match factor {
            Some(factor) => RopeScaling::Linear { factor },
            None => {
                return Err(f.err(format!(
                    "rope.scaling.type is linear but '{}' is missing",
                    key("rope.scaling.factor")
                )))
            }
        },
        Some(other) => {
            return Err(f.err(format!(
                "rope scaling type '{other}' is not supported (supported: none, linear, and Llama 3's rope_freqs)"
            )))
        }
    };
    // Phi-3's long-context variants carry LongRoPE's factors as tensors.
    if ["rope_factors_long.weight", "rope_factors_short.weight"]
        .iter()
        .any(|name| f.tensor(name).is_some())
    {
        return Err(f.err(
            "it uses LongRoPE (rope_factors_long/short tensors), which taper does not support"
                .into(),
        ));
    }
    // Llama 3.1's scaling travels as a tensor of per-frequency divisors.
    if let Some(entry) = f.tensor("rope_freqs.weight") {
        let half = head_dim / 2;
        if entry.shape != [half] || entry.dtype != candle_core::quantized::GgmlDType::F32 {
            return Err(f.err(format!(
                "rope_freqs.weight is {} of shape {:?}, expected F32 of shape [{half}]",
                super::type_name(entry.dtype),
                entry.shape
            )));
        }
        let factors = f
            .bytes(entry)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        scaling = RopeScaling::Factors(factors);
    }
    let global = Rope { theta, scaling };
    let local = (arch == Architecture::Gemma3).then(|| -> Result<Rope> {
        Ok(Rope {
            theta: f.f64(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0),
            // Gemma 3's sliding layers never use the long-context scaling.
            scaling: RopeScaling::None,
        })
    });
    Ok((global, local.transpose()?))
}

/// Which layers use a sliding window: `attention.sliding_window` with
/// `attention.sliding_window_pattern` (one bool per layer, or `n`: every
/// `n`-th layer is full), else llama.cpp's pattern for the architecture.
fn layer_attention(
    f: &GgufFile,
    arch: Architecture,
    key: &dyn Fn(&str) -> String,
    num_layers: usize,
) -> Result<Vec<LayerAttention>> {
    let all_full = vec![LayerAttention::Full; num_layers];
    let window = match f.usize(&key("attention.sliding_window"))? {
        Some(w) if w > 0 => w,
        _ => return Ok(all_full),
    };
    let pattern_key = key("attention.sliding_window_pattern");
    let sliding: Vec<bool> = match f.get(&pattern_key) {
        Some(candle_core::quantized::gguf_file::Value::Array(items)) => {
            let flags = items
                .iter()
                .map(|v| match v {
                    candle_core::quantized::gguf_file::Value::Bool(b) => Ok(*b),
                    _ => Err(f.err(format!("'{pattern_key}' must be bools or a number"))),
                })
                .collect::<Result<Vec<_>>>()?;
            if flags.len() != num_layers {
                return Err(f.err(format!(
                    "'{pattern_key}' has {} entries for {num_layers} layers",
                    flags.len()
                )));
            }
            flags
        }
        _ => {
            let default = match arch {
                Architecture::Gemma2 => 2,
                Architecture::Gemma3 => 6,
                // Phi-3 slides on every layer; the others ignore the key,
                // as llama.cpp does.
                Architecture::Phi3 => 0,
                _ => return Ok(all_full),
            };
            let n = f.usize(&pattern_key)?.unwrap_or(default);
            // llama.cpp's `set_swa_pattern`: 0 means every layer slides.
            (0..num_layers).map(|i| n == 0 || i % n < n - 1).collect()
        }
    };
    Ok(sliding
        .into_iter()
        .map(|s| {
            if s {
                LayerAttention::Sliding { window }
            } else {
                LayerAttention::Full
            }
        })
        .collect())
}

/// The expert layers, from `{arch}.expert_count` and friends: llama.cpp's
/// merged 3-D expert tensors serve every layer (it has no dense layers in a
/// Qwen3-MoE or Mixtral file). llama.cpp renormalises the chosen experts'
/// weights for both families, as Mixtral and the released Qwen3-MoE models
/// (`norm_topk_prob: true`) do.
fn moe(
    f: &GgufFile,
    arch: Architecture,
    key: &dyn Fn(&str) -> String,
    num_layers: usize,
    intermediate_size: usize,
) -> Result<Option<MoeConfig>> {
    let naming = match arch {
        Architecture::Mixtral => MoeNaming::Mixtral,
        Architecture::Qwen3Moe => MoeNaming::Qwen,
        _ => return Ok(None),
    };
    let num_experts = f.require_usize(&key("expert_count"))?;
    let top_k = f.require_usize(&key("expert_used_count"))?;
    if num_experts == 0 || top_k == 0 || top_k > num_experts {
        return Err(f.err(format!(
            "expert_used_count ({top_k}) must be between 1 and expert_count ({num_experts})"
        )));
    }
    let expert_intermediate_size = f
        .usize(&key("expert_feed_forward_length"))?
        .unwrap_or(intermediate_size);
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        norm_topk_prob: true,
        expert_intermediate_size,
        sparse_layers: vec![true; num_layers],
        naming,
    }))
}
