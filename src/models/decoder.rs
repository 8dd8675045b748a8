//! The decoder-only transformer behind every supported architecture.
//!
//! Llama, Mistral, Qwen2/3, Phi-3 and Gemma 2/3 differ only in switches that
//! [`ModelConfig`] resolves (biases, q/k norms, sandwich norms, soft-capping,
//! sliding windows, fused projections), so one implementation serves them
//! all; see `docs/ARCHITECTURE.md` for why this departs from candle's
//! one-file-per-model layout. Reference: `modeling_llama.py`,
//! `modeling_qwen2.py`, `modeling_qwen3.py`, `modeling_phi3.py`,
//! `modeling_gemma2.py` and `modeling_gemma3.py` in `transformers`.
//!
//! The forward pass packs the new tokens of every sequence in the batch into
//! one `[tokens, hidden]` matrix, so the projections and MLPs (where the
//! weights are read) run once for the whole batch; only attention runs per
//! sequence, against that sequence's own cache and positions.

use candle_core::{DType, Device, Tensor};

use crate::config::{LayerAttention, ModelConfig, MoeNaming};
use crate::cpu_attention::{self, Visibility};
use crate::kv_cache::SeqKvCache;
use crate::models::layers::{
    apply_rope, compute_dtype, grouped_attention, soft_cap, Embedding, Linear, Mlp, RmsNorm,
    RotaryEmbedding,
};
use crate::models::moe::MoeBlock;
use crate::quant::Quant;
use crate::weights::TensorSource;
use crate::{Error, Result};

/// Which logits a sequence needs back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last new token's, to pick the next token.
    Last,
    /// One row per new token (prompt logprobs, echo, tests).
    All,
    /// None: a prompt chunk that is not the prompt's last (chunked prefill);
    /// its rows skip the head. Its logits come back as `[0, vocab]`.
    None,
}

/// One sequence in a forward pass: its new tokens and its cache.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqKvCache,
    pub logits: Logits,
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Per head, or over the whole projection (`ModelConfig::qk_norm_full`).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    /// Whether q and k are rotated (SmolLM3 leaves some layers without).
    rotary: bool,
    kind: LayerAttention,
    /// Index into the decoder's rotary tables (0: global, 1: local).
    rope: usize,
}

struct Layer {
    /// `None` for OLMo 2, which normalises only after each block.
    input_norm: Option<RmsNorm>,
    attn: Attention,
    /// Gemma: normalises the attention output before the residual add.
    post_attn_norm: Option<RmsNorm>,
    /// The norm before the MLP (Llama's `post_attention_layernorm`,
    /// Gemma's `pre_feedforward_layernorm`; none in OLMo 2).
    pre_mlp_norm: Option<RmsNorm>,
    ffn: FeedForward,
    /// Gemma: normalises the MLP output before the residual add.
    post_mlp_norm: Option<RmsNorm>,
}

/// A layer's feed-forward part.
enum FeedForward {
    Dense(Mlp),
    /// Mixture of experts (`models::moe`).
    Moe(MoeBlock),
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(m) => m.forward(x),
            FeedForward::Moe(m) => m.forward(x),
        }
    }
}

impl Layer {
    /// Weights of every norm of the layer.
    fn norm_weights(&self) -> usize {
        let a = &self.attn;
        [
            &self.input_norm,
            &self.post_attn_norm,
            &self.pre_mlp_norm,
            &self.post_mlp_norm,
            &a.q_norm,
            &a.k_norm,
        ]
        .into_iter()
        .flatten()
        .map(RmsNorm::num_weights)
        .sum()
    }

    /// Every projection of the layer, experts and router included.
    fn linears(&self) -> Vec<&Linear> {
        let a = &self.attn;
        let mut all = vec![&a.q, &a.k, &a.v, &a.o];
        match &self.ffn {
            FeedForward::Dense(m) => all.extend([&m.gate, &m.up, &m.down]),
            FeedForward::Moe(m) => all.extend(m.linears()),
        }
        all
    }
}

/// A loaded model, ready to run forward passes.
pub struct Decoder {
    config: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    ropes: Vec<RotaryEmbedding>,
    /// Activations' and the KV cache's dtype (see `compute_dtype`).
    dtype: DType,
    /// The dense weights' dtype.
    weight_dtype: DType,
    device: Device,
}

/// Passes of up to this many new tokens keep the pool's workers polling
/// (see [`Decoder::forward_spinning`]).
const SPIN_MAX_TOKENS: usize = 16;

/// A polling worker stops after this long without finding work (see
/// [`Decoder::forward_spinning`]). The gaps between a decode step's
/// products are tens of microseconds, which this leaves covered.
const SPIN_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(2);

impl Decoder {
    /// Builds the model from its weights, checking every tensor's shape.
    /// With `quant`, every linear projection (the head too, but not the
    /// embedding lookup) is quantized as soon as it is read.
    pub fn load(
        config: ModelConfig,
        store: &dyn TensorSource,
        dtype: DType,
        device: &Device,
        quant: Quant,
    ) -> Result<Self> {
        if quant != Quant::None && !device.is_cpu() {
            return Err(Error::Device(format!(
                "--quant {quant} runs on the CPU only for now: use --device cpu, or --quant none on a GPU"
            )));
        }
        let c = &config;
        // Weights about to be quantized are read in f32 (on the CPU).
        let wdtype = match quant {
            Quant::None => dtype,
            _ => DType::F32,
        };
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_dim = c.num_heads * hd;
        let kv_dim = c.num_kv_heads * hd;
        let norm = |name: &str, dim: usize| {
            RmsNorm::load(store, name, dim, c.rms_norm_eps, c.norm_plus_one, device)
        };
        let linear = |prefix: &str, in_dim: usize, out_dim: usize, bias: bool| {
            Linear::load(store, prefix, in_dim, out_dim, bias, dtype, device, quant)
        };
        // Phi-3's fused projections, split by rows into one Linear each.
        let fused = |name: &str, parts: &[usize]| -> Result<Vec<Linear>> {
            let rows: usize = parts.iter().sum();
            let ranges: Vec<_> = parts
                .iter()
                .scan(0, |start, &len| {
                    *start += len;
                    Some(*start - len..*start)
                })
                .collect();
            // Stored quantized (GGUF): each part's rows, as stored.
            if device.is_cpu() {
                let mut quantized = Vec::with_capacity(parts.len());
                for r in &ranges {
                    match store.load_quantized(name, &[rows, h], r.clone())? {
                        Some(q) => quantized.push(Linear::from_quantized(q, None)),
                        None => break,
                    }
                }
                if quantized.len() == parts.len() {
                    return Ok(quantized);
                }
            }
            let w = store.load(name, &[rows, h], wdtype, device)?;
            ranges
                .into_iter()
                .map(|r| {
                    Linear::quantized(w.narrow(0, r.start, r.len())?.contiguous()?, None, quant)
                })
                .collect()
        };

        // A tied head stored quantized (GGUF) serves as the head as it is.
        let stored_head = if c.tie_word_embeddings && device.is_cpu() {
            store.load_quantized(
                "model.embed_tokens.weight",
                &[c.vocab_size, h],
                0..c.vocab_size,
            )?
        } else {
            None
        };
        // With quantized projections on the CPU, the lookup table (read one
        // row a token, never streamed) is kept in bf16 rather than f32: it is
        // the largest tensor of a small model (545 of Qwen2.5-0.5B's 1,024
        // MiB under --quant q8_0), and bf16 rounds a row far less than the
        // quantized projections do. It is loaded in bf16 directly, so the
        // f32 table never exists.
        let slim = device.is_cpu()
            && dtype == DType::F32
            && (quant != Quant::None || stored_head.is_some());
        let table = store.load(
            "model.embed_tokens.weight",
            &[c.vocab_size, h],
            if slim { DType::BF16 } else { dtype },
            device,
        )?;
        // Tied checkpoints may still carry an `lm_head.weight`; like
        // `transformers`, a tied model ignores it and uses the embeddings.
        let tied_head = match stored_head {
            Some(q) => Some(Linear::from_quantized(q, None)),
            None if !c.tie_word_embeddings => None,
            None if quant == Quant::None => Some(Linear::quantized(table.clone(), None, quant)?),
            // Quantizing copies the table (the lookup stays dense), a block
            // of rows at a time: widening the whole bf16 table to f32 first
            // would be the load's peak.
            None => Some(Linear::from_quantized(
                crate::quant::quantize_tensor_by_rows(&table, quant.for_head())?,
                None,
            )),
        };
        let embed = Embedding::new(table);

        let mut ropes = vec![RotaryEmbedding::new(&c.rope, hd)];
        if let Some(local) = &c.rope_local {
            ropes.push(RotaryEmbedding::new(local, hd));
        }

        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let (q, k, v) = if c.fused_qkv {
                let name = format!("{p}.self_attn.qkv_proj.weight");
                let [q, k, v] = split_parts(fused(&name, &[q_dim, kv_dim, kv_dim])?)?;
                (q, k, v)
            } else {
                (
                    linear(&format!("{p}.self_attn.q_proj"), h, q_dim, c.qkv_bias)?,
                    linear(&format!("{p}.self_attn.k_proj"), h, kv_dim, c.qkv_bias)?,
                    linear(&format!("{p}.self_attn.v_proj"), h, kv_dim, c.qkv_bias)?,
                )
            };
            let o = linear(&format!("{p}.self_attn.o_proj"), q_dim, h, c.o_bias)?;
            let (q_norm, k_norm) = if c.qk_norm || c.qk_norm_full {
                let (qw, kw) = if c.qk_norm_full {
                    (q_dim, kv_dim)
                } else {
                    (hd, hd)
                };
                (
                    Some(norm(&format!("{p}.self_attn.q_norm.weight"), qw)?),
                    Some(norm(&format!("{p}.self_attn.k_norm.weight"), kw)?),
                )
            } else {
                (None, None)
            };
            let kind = c.layer_attention[i];
            let rope = usize::from(
                matches!(kind, LayerAttention::Sliding { .. }) && c.rope_local.is_some(),
            );

            let sparse = c
                .moe
                .as_ref()
                .filter(|m| m.sparse_layers.get(i).copied().unwrap_or(false));
            let ffn = match sparse {
                Some(moe) => {
                    let inter = moe.expert_intermediate_size;
                    let (block, [w_gate, w_up, w_down]) = match moe.naming {
                        MoeNaming::Qwen => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
                        MoeNaming::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
                    };
                    // The router stays dense: it is small, and a quantized
                    // router would move tokens between experts.
                    let router = Linear::load(
                        store,
                        &format!("{p}.{block}.gate"),
                        h,
                        moe.num_experts,
                        false,
                        dtype,
                        device,
                        Quant::None,
                    )?;
                    let experts = (0..moe.num_experts)
                        .map(|e| {
                            let x = format!("{p}.{block}.experts.{e}");
                            Ok(Mlp {
                                gate: linear(&format!("{x}.{w_gate}"), h, inter, false)?,
                                up: linear(&format!("{x}.{w_up}"), h, inter, false)?,
                                down: linear(&format!("{x}.{w_down}"), inter, h, false)?,
                                activation: c.activation,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    FeedForward::Moe(MoeBlock {
                        router,
                        experts,
                        top_k: moe.top_k,
                        norm_topk_prob: moe.norm_topk_prob,
                    })
                }
                None => {
                    let inter = c.intermediate_size;
                    let (gate, up) = if c.fused_gate_up {
                        let name = format!("{p}.mlp.gate_up_proj.weight");
                        let [gate, up] = split_parts(fused(&name, &[inter, inter])?)?;
                        (gate, up)
                    } else {
                        (
                            linear(&format!("{p}.mlp.gate_proj"), h, inter, c.mlp_bias)?,
                            linear(&format!("{p}.mlp.up_proj"), h, inter, c.mlp_bias)?,
                        )
                    };
                    let down = linear(&format!("{p}.mlp.down_proj"), inter, h, c.mlp_bias)?;
                    FeedForward::Dense(Mlp {
                        gate,
                        up,
                        down,
                        activation: c.activation,
                    })
                }
            };

            let (post_attn_norm, pre_mlp_norm, post_mlp_norm) = if c.sandwich_norms {
                let pre_mlp = if c.pre_norms {
                    Some(norm(&format!("{p}.pre_feedforward_layernorm.weight"), h)?)
                } else {
                    None
                };
                (
                    Some(norm(&format!("{p}.post_attention_layernorm.weight"), h)?),
                    pre_mlp,
                    Some(norm(&format!("{p}.post_feedforward_layernorm.weight"), h)?),
                )
            } else {
                (
                    None,
                    Some(norm(&format!("{p}.post_attention_layernorm.weight"), h)?),
                    None,
                )
            };
            let input_norm = if c.pre_norms {
                Some(norm(&format!("{p}.input_layernorm.weight"), h)?)
            } else {
                None
            };

            layers.push(Layer {
                input_norm,
                attn: Attention {
                    q,
                    k,
                    v,
                    o,
                    q_norm,
                    k_norm,
                    rotary: c.rope_layers.get(i).copied().unwrap_or(true),
                    kind,
                    rope,
                },
                post_attn_norm,
                pre_mlp_norm,
                ffn,
                post_mlp_norm,
            });
        }

        let final_norm = norm("model.norm.weight", h)?;
        let lm_head = if let Some(head) = tied_head {
            head
        } else {
            // The head in its own format (Q6_K under a 4-bit --quant).
            let head = quant.for_head();
            Linear::load(
                store,
                "lm_head",
                h,
                c.vocab_size,
                false,
                dtype,
                device,
                head,
            )?
        };

        Ok(Decoder {
            config,
            embed,
            layers,
            norm: final_norm,
            lm_head,
            ropes,
            dtype: compute_dtype(dtype, device),
            weight_dtype: dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The dtype of activations and of the KV cache.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of the dense weights (bf16 weights compute in f32 on the
    /// CPU: see `compute_dtype`).
    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A fresh, empty cache for one sequence of this model.
    pub fn new_cache(&self) -> SeqKvCache {
        SeqKvCache::new(self.config.num_layers)
    }

    /// Number of parameters, counting a tied embedding once.
    pub fn num_parameters(&self) -> usize {
        let c = &self.config;
        let mut n = self.embed.table().elem_count() + c.hidden_size;
        if !c.tie_word_embeddings {
            n += self.lm_head.num_weights();
        }
        for l in &self.layers {
            for lin in l.linears() {
                n += lin.num_weights();
            }
            n += l.norm_weights();
            if c.qkv_bias {
                n += (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
            }
        }
        n
    }

    /// The quantized formats the projections (and the head) are stored in,
    /// each once, in the order met; empty when all are dense. A GGUF file
    /// may mix several (Q4_K_M: Q4_K and Q6_K).
    pub fn projection_formats(&self) -> Vec<Quant> {
        let mut formats = Vec::new();
        let layers = self.layers.iter().flat_map(Layer::linears);
        for lin in layers.chain([&self.lm_head]) {
            let f = lin.format();
            if f != Quant::None && !formats.contains(&f) {
                formats.push(f);
            }
        }
        formats
    }

    /// Bytes of one row of the embedding table (what a token's lookup reads).
    pub fn embedding_row_bytes(&self) -> usize {
        let t = self.embed.table();
        self.config.hidden_size * t.dtype().size_in_bytes()
    }

    /// Whether the head is the embedding table itself (tied and dense), so
    /// a decode step reads the table whole once, as the head. A quantized
    /// tied head (`--quant`, or a GGUF's quantized table) is a copy.
    pub fn head_is_embedding_table(&self) -> bool {
        self.config.tie_word_embeddings && !self.lm_head.is_quantized()
    }

    /// Bytes the weights take in memory, in their runtime dtypes (norms are
    /// f32), counting a tied embedding once, as `num_parameters` counts.
    /// Bytes of expert weights that a decode step's token does not read: in
    /// each mixture-of-experts layer it reads `top_k` of the experts (all of
    /// one size), so the rest of their bytes are not part of its cost.
    pub fn unrouted_expert_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| match &l.ffn {
                FeedForward::Moe(m) => Some(m),
                FeedForward::Dense(_) => None,
            })
            .map(|m| {
                let all: usize = m
                    .experts
                    .iter()
                    .flat_map(|e| [&e.gate, &e.up, &e.down])
                    .map(Linear::weight_bytes)
                    .sum();
                all - all * m.top_k.min(m.experts.len()) / m.experts.len().max(1)
            })
            .sum()
    }

    pub fn weight_bytes(&self) -> usize {
        let c = &self.config;
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let dsize = self.dtype.size_in_bytes();
        let mut n = bytes(self.embed.table()) + 4 * c.hidden_size;
        // A quantized tied head is a copy of the (dense) embeddings.
        if !self.head_is_embedding_table() {
            n += self.lm_head.weight_bytes();
        }
        for l in &self.layers {
            for lin in l.linears() {
                n += lin.weight_bytes();
            }
            n += 4 * l.norm_weights();
            if c.qkv_bias {
                n += dsize * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
            }
        }
        n
    }

    /// Runs the new tokens of every sequence through the model, appending
    /// their keys and values to each sequence's cache, and returns each
    /// sequence's logits (`[1, vocab]` or `[tokens, vocab]`, f32).
    pub fn forward(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Tensor>> {
        // The pass runs on one of rayon's worker threads, so the ~170
        // parallel products of a decode step start from inside the pool:
        // the starting worker takes its share and the others steal the rest.
        // Started from outside, each product would instead wake the pool and
        // put the caller to sleep until it finished, two context switches
        // per product.
        if rayon::current_thread_index().is_some() {
            self.forward_spinning(batch)
        } else {
            rayon::scope(|_| self.forward_spinning(batch))
        }
    }

    /// [`Self::forward_in_pool`] with the pool's other workers kept awake
    /// for its duration. Between two parallel products the pass runs
    /// candle's serial ops for tens of microseconds, long enough for an
    /// idle rayon worker to fall asleep, and each of a decode step's ~65
    /// products then began by waking it through the kernel (`perf`: a
    /// third of the time outside the kernels was the scheduler). Each
    /// other worker instead polls for rayon work until the pass ends,
    /// running what it finds, and yields the core to the OS now and then.
    /// Measured with and without, three alternations each: Llama-3.2-1B
    /// shape q4_k tg128 median 33.5 → 35.9 t/s, Qwen2.5-0.5B shape 70.9 →
    /// 72.7.
    fn forward_spinning(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Tensor>> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        /// Ends the polling when the pass returns or unwinds.
        struct Done(Arc<AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        // Prefill-sized passes are left alone: their products are long
        // enough that waking the pool costs little, and the polling took
        // a core from candle's element-wise pool (pp512 4% slower).
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        if rayon::current_num_threads() < 2 || tokens > SPIN_MAX_TOKENS {
            return self.forward_in_pool(batch);
        }
        let done = Done(Arc::new(AtomicBool::new(false)));
        let flag = Arc::clone(&done.0);
        let me = rayon::current_thread_index();
        rayon::spawn_broadcast(move |ctx| {
            if Some(ctx.index()) == me {
                return;
            }
            // The poll also gives up after `SPIN_IDLE_LIMIT` without finding
            // work. A worker can start this job nested inside another one:
            // one it stole from the pass and is waiting in (for a piece of
            // it that the pass's thread took back). The pass then waits for
            // that job, which cannot finish until this poll returns, so a
            // poll that waited for the pass alone would never end (seen:
            // `taper bench` hung in the Qwen2.5-0.5B-shape Q8_0 decode).
            // With no work coming, the poll returns and the pass goes on.
            let mut idle = 0u32;
            let mut idle_since = std::time::Instant::now();
            while !flag.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle = 0;
                    continue;
                }
                if idle == 0 {
                    idle_since = std::time::Instant::now();
                }
                idle += 1;
                if idle.is_multiple_of(64) {
                    if idle_since.elapsed() > SPIN_IDLE_LIMIT {
                        return;
                    }
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        let out = self.forward_in_pool(batch);
        drop(done);
        out
    }

    fn forward_in_pool(&self, batch: &mut [SeqInput<'_>]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for seq in batch.iter() {
            if seq.tokens.is_empty() {
                return Err(Error::InvalidRequest(
                    "a sequence in the batch has no new tokens".into(),
                ));
            }
            let start = seq.cache.len();
            if start + seq.tokens.len() > c.max_position_embeddings {
                return Err(Error::InvalidRequest(format!(
                    "the sequence needs {} positions but the model's context is {} (max_position_embeddings)",
                    start + seq.tokens.len(),
                    c.max_position_embeddings
                )));
            }
            if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(Error::InvalidRequest(format!(
                    "token id {bad} is outside the vocabulary (vocab_size {})",
                    c.vocab_size
                )));
            }
            ids.extend_from_slice(seq.tokens);
            positions.extend(start..start + seq.tokens.len());
        }
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let mut x = self.embed.forward(&ids)?.to_dtype(self.dtype)?;
        if let Some(scale) = c.embedding_scale {
            // Gemma rounds the scale to the compute dtype before multiplying.
            let s = Tensor::new(scale as f32, &self.device)?.to_dtype(self.dtype)?;
            x = x.broadcast_mul(&s)?;
        }
        let tables = self
            .ropes
            .iter()
            .map(|r| r.tables(&positions, self.dtype, &self.device))
            .collect::<Result<Vec<_>>>()?;

        let norm = |n: &Option<RmsNorm>, x: &Tensor| match n {
            Some(n) => n.forward(x),
            None => Ok(x.clone()),
        };
        // Granite scales each block's output before the residual add.
        let branch = |t: Tensor| -> Result<Tensor> {
            Ok(match c.residual_scale {
                Some(s) => (t * s)?,
                None => t,
            })
        };
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let residual = x.clone();
            let h = norm(&layer.input_norm, &x)?;
            let (cos, sin) = &tables[layer.attn.rope];
            let attn = self.attention(layer_idx, &layer.attn, &h, cos, sin, batch)?;
            let attn = norm(&layer.post_attn_norm, &attn)?;
            x = (residual + branch(attn)?)?;
            let residual = x.clone();
            let h = norm(&layer.pre_mlp_norm, &x)?;
            let m = layer.ffn.forward(&h)?;
            let m = norm(&layer.post_mlp_norm, &m)?;
            x = (residual + branch(m)?)?;
        }
        for seq in batch.iter_mut() {
            seq.cache.advance(seq.tokens);
        }

        // Only the rows whose logits are wanted go through the (large) head.
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        let mut offset = 0u32;
        for seq in batch.iter() {
            let n = seq.tokens.len() as u32;
            match seq.logits {
                Logits::Last => {
                    rows.push(offset + n - 1);
                    counts.push(1);
                }
                Logits::All => {
                    rows.extend(offset..offset + n);
                    counts.push(n as usize);
                }
                Logits::None => counts.push(0),
            }
            offset += n;
        }
        let n_rows = rows.len();
        if n_rows == 0 {
            let empty = Tensor::zeros((0, c.vocab_size), DType::F32, &self.device)?;
            return Ok(vec![empty; counts.len()]);
        }
        let rows = Tensor::from_vec(rows, n_rows, &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = self.norm.forward(&x)?;
        let mut logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        if let Some(d) = c.logit_divisor {
            logits = (logits / d)?;
        }
        if let Some(cap) = c.final_logit_softcap {
            logits = soft_cap(&logits, cap)?;
        }
        let mut out = Vec::with_capacity(counts.len());
        let mut start = 0;
        for n in counts {
            out.push(if n == 0 {
                Tensor::zeros((0, c.vocab_size), DType::F32, &self.device)?
            } else {
                logits.narrow(0, start, n)?
            });
            start += n;
        }
        Ok(out)
    }

    /// Self-attention for a packed batch: projections over all tokens at
    /// once, then each sequence attends over its own cache.
    fn attention(
        &self,
        layer_idx: usize,
        a: &Attention,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let c = &self.config;
        let (t, _) = h.dims2()?;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let groups = nh / nkv;
        let [mut q, mut k, v] = Linear::forward_many([&a.q, &a.k, &a.v], h)?;
        let norms = a.q_norm.as_ref().zip(a.k_norm.as_ref());
        if let (Some((qn, kn)), true) = (norms, c.qk_norm_full) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let v = match c.clip_qkv {
            Some(clip) => {
                let clip = clip as f32;
                q = q.clamp(-clip, clip)?;
                k = k.clamp(-clip, clip)?;
                v.clamp(-clip, clip)?
            }
            None => v,
        };
        let mut q = q.reshape((t, nh, hd))?;
        let mut k = k.reshape((t, nkv, hd))?;
        let v = v.reshape((t, nkv, hd))?;
        if let (Some((qn, kn)), false) = (norms, c.qk_norm_full) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (q, k) = if a.rotary {
            (apply_rope(&q, cos, sin)?, apply_rope(&k, cos, sin)?)
        } else {
            (q, k)
        };

        let mut outputs = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for seq in batch.iter_mut() {
            let n = seq.tokens.len();
            let start_pos = seq.cache.len();
            // [n, kv, hd] -> [kv, n, hd]
            let k_new = k.narrow(0, offset, n)?.transpose(0, 1)?;
            let v_new = v.narrow(0, offset, n)?.transpose(0, 1)?;
            let (k_all, v_all) = seq.cache.append(layer_idx, &k_new, &v_new)?;
            let kv_len = start_pos + n;
            let q_seq = q.narrow(0, offset, n)?;
            let seen = Visibility {
                start_pos,
                window: a.kind.window(),
            };
            // On the CPU every query, whether of a decode step or of a
            // prefill's chunk, attends in one pass straight over the cache
            // (see `cpu_attention`): a query's output then depends on the
            // sequence alone, not on how many other tokens share its pass,
            // so a prefix-cache hit, a chunked prefill or a recompute gives
            // the bits a one-pass prefill gives. Other devices and dtypes
            // take the general path.
            let softcap = c.attn_logit_softcap.map(|c| c as f32);
            let fused =
                cpu_attention::attend(&q_seq, &k_all, &v_all, seen, c.attn_scale as f32, softcap)?;
            let o = match fused {
                Some(o) => o,
                None => {
                    // Queries grouped by the KV head they share:
                    // [kv, groups * n, hd], so grouped-query attention needs
                    // no copies of K and V.
                    let q_s = q_seq
                        .reshape((n, nkv, groups, hd))?
                        .permute((1, 2, 0, 3))?
                        .reshape((nkv, groups * n, hd))?;
                    let mask = self.mask(seen, n, kv_len)?;
                    grouped_attention(
                        &q_s,
                        &k_all,
                        &v_all,
                        mask.as_ref(),
                        c.attn_scale,
                        c.attn_logit_softcap,
                    )?
                    .reshape((nkv, groups, n, hd))?
                    .permute((2, 0, 1, 3))?
                    .reshape((n, nh * hd))?
                }
            };
            outputs.push(o);
            offset += n;
        }
        let o = if outputs.len() == 1 {
            outputs
                .pop()
                .ok_or_else(|| Error::InvalidRequest("empty batch".into()))?
        } else {
            Tensor::cat(&outputs, 0)?
        };
        a.o.forward(&o)
    }

    /// The additive mask for `n` queries over `kv_len` keys: `-inf` where
    /// `seen` hides a key (causal, and outside the window on sliding
    /// layers). `None` when nothing is masked (a decode step inside the
    /// window).
    fn mask(&self, seen: Visibility, n: usize, kv_len: usize) -> Result<Option<Tensor>> {
        let needs_window = seen.window.is_some_and(|w| kv_len > w);
        if n == 1 && !needs_window {
            return Ok(None);
        }
        let mut m = vec![f32::NEG_INFINITY; n * kv_len];
        for (i, row) in m.chunks_exact_mut(kv_len).enumerate() {
            row[seen.keys(i, kv_len)].fill(0.0);
        }
        Ok(Some(Tensor::from_vec(m, (n, kv_len), &self.device)?))
    }
}

/// The parts of a fused projection as an array (`fused` returns one per
/// part asked for).
fn split_parts<const N: usize>(parts: Vec<Linear>) -> Result<[Linear; N]> {
    parts
        .try_into()
        .map_err(|_| Error::InvalidRequest(format!("a fused projection splits in {N}")))
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("architecture", &self.config.architecture)
            .field("layers", &self.layers.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}
