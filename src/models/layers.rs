//! The building blocks every supported decoder shares: linear projections
//! (dense, or Q8_0 through `quant`), RMSNorm (plain and Gemma's `1 + w`
//! form), the gated MLP and rotary embeddings with per-token positions.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};

use crate::config::{Activation, Rope, RopeScaling};
use crate::dense;
use crate::quant::{self, QMatrix, Quant};
use crate::weights::TensorSource;
use crate::{Error, Result};

/// The dtype activations (and the KV cache) use for weights of `dtype` on
/// `device`.
///
/// bf16 weights on the CPU compute in f32: the dense kernels read bf16
/// weights and accumulate in f32 anyway, and candle's other CPU ops (norms,
/// softmax, attention products) have no fast bf16 path, so bf16 activations
/// would only add conversions and rounding. The weights, which are what a
/// decode step reads, stay bf16.
pub fn compute_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// `y = x Wᵀ + b` on `[tokens, in]` inputs, with `W` dense or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// `[out, in]` in the model's dtype, on its device.
    Dense(Tensor),
    /// Quantized, on the CPU; shared so that cloning a layer copies no
    /// weights.
    Quantized(Arc<QMatrix>),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    /// A projection over `weight` (`[out, in]`), stored as `quant` says:
    /// quantizing reads `weight` once, and the caller's copy can then be
    /// dropped.
    pub fn quantized(weight: Tensor, bias: Option<Tensor>, quant: Quant) -> Result<Self> {
        let weight = match quant {
            Quant::None => LinearWeight::Dense(weight),
            quant => LinearWeight::Quantized(Arc::new(quant::quantize_tensor(&weight, quant)?)),
        };
        Ok(Linear { weight, bias })
    }

    /// A projection over weights that arrive already quantized (GGUF).
    pub fn from_quantized(weight: QMatrix, bias: Option<Tensor>) -> Self {
        Linear {
            weight: LinearWeight::Quantized(Arc::new(weight)),
            bias,
        }
    }

    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`). A weight
    /// the source holds quantized (GGUF) is used as stored on the CPU,
    /// whatever `quant` says. Otherwise, to quantize, the weight is read in
    /// f32, quantized and the f32 copy dropped before the next tensor is
    /// read, so the dense model never exists in memory.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        store: &dyn TensorSource,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: DType,
        device: &Device,
        quant: Quant,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let bias = if bias {
            let bias_dtype = compute_dtype(dtype, device);
            Some(store.load(&format!("{prefix}.bias"), &[out_dim], bias_dtype, device)?)
        } else {
            None
        };
        // Quantized products run on the CPU only; elsewhere the source
        // dequantizes.
        if device.is_cpu() {
            if let Some(q) = store.load_quantized(&name, &[out_dim, in_dim], 0..out_dim)? {
                return Ok(Linear::from_quantized(q, bias));
            }
        }
        let weight = match quant {
            Quant::None => store.load(&name, &[out_dim, in_dim], dtype, device)?,
            _ => store.load(&name, &[out_dim, in_dim], DType::F32, &Device::Cpu)?,
        };
        Linear::quantized(weight, bias, quant)
    }

    /// Whether the weight is quantized.
    /// The quantized weights, when the layer has them and no bias (what
    /// grouped products over several layers take).
    pub fn quantized_unbiased(&self) -> Option<&QMatrix> {
        match (&self.weight, &self.bias) {
            (LinearWeight::Quantized(q), None) => Some(q.as_ref()),
            _ => None,
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Quantized(_))
    }

    /// The weight's quantized format (`Quant::None` when dense).
    pub fn format(&self) -> Quant {
        match &self.weight {
            LinearWeight::Dense(_) => Quant::None,
            LinearWeight::Quantized(q) => q.format(),
        }
    }

    /// Number of weights (`out × in`), without the bias.
    pub fn num_weights(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count(),
            LinearWeight::Quantized(q) => q.rows() * q.cols(),
        }
    }

    /// Bytes the weight takes in memory (quantized blocks with their
    /// scales, or the dense tensor), without the bias.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.size_bytes(),
        }
    }

    /// The projections of one input by several layers (q, k, v; gate, up).
    /// When all are quantized they run through `quant::matmul_tensor_many`:
    /// in one parallel pass, sharing the quantized input and one
    /// synchronisation of the thread pool, when they share a format.
    pub fn forward_many<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let quantized: Option<Vec<&QMatrix>> = layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Quantized(q) => Some(q.as_ref()),
                LinearWeight::Dense(_) => None,
            })
            .collect();
        let ys = match quantized {
            Some(ws) => quant::matmul_tensor_many(&ws, x)?
                .into_iter()
                .zip(layers)
                .map(|(y, l)| l.add_bias(y))
                .collect::<Result<Vec<_>>>()?,
            None => layers
                .iter()
                .map(|l| l.forward(x))
                .collect::<Result<Vec<_>>>()?,
        };
        ys.try_into()
            .map_err(|_| Error::InvalidRequest("one output per projection".into()))
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => {
                if dense::handles(w.dtype(), w.device()) {
                    dense::matmul_tensor(w, x)?.to_dtype(x.dtype())?
                } else {
                    x.matmul(&w.t()?)?
                }
            }
            LinearWeight::Quantized(q) => quant::matmul_tensor(q, x)?,
        };
        self.add_bias(y)
    }
}

/// Scaled dot-product attention of one sequence, with the queries grouped by
/// the KV head they share: `q` is `[kv_heads, groups * n, head_dim]`, `k`
/// and `v` are `[kv_heads, kv_len, head_dim]`, `mask` is added to the scores
/// of each group's `n` queries (`[n, kv_len]`). Returns
/// `[kv_heads, groups * n, head_dim]` in `q`'s dtype. Grouping the queries
/// lets grouped-query attention read each K and V once, without repeating
/// them per query head. Scores and softmax are in f32.
pub fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (nkv, rows, _) = q.dims3()?;
    let kv_len = k.dim(1)?;
    let mut scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    if let Some(cap) = softcap {
        scores = soft_cap(&scores, cap)?;
    }
    if let Some(mask) = mask {
        // View the scores as [kv, groups, n, kv_len] to add it per group.
        let n = mask.dim(0)?;
        scores = scores
            .reshape((nkv, rows / n.max(1), n, kv_len))?
            .broadcast_add(mask)?
            .reshape((nkv, rows, kv_len))?;
    }
    let probs = crate::cpu_ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// RMSNorm over the last dimension, computed in f32 as `transformers` does.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Already `1 + w` for Gemma, so the forward pass is the same for both.
    scale: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(
        store: &dyn TensorSource,
        name: &str,
        dim: usize,
        eps: f64,
        plus_one: bool,
        device: &Device,
    ) -> Result<Self> {
        let w = store.load(name, &[dim], DType::F32, device)?;
        let scale = if plus_one { (w + 1.0)? } else { w };
        Ok(RmsNorm {
            scale,
            eps: eps as f32,
        })
    }

    /// Weights (one per normalised value).
    pub fn num_weights(&self) -> usize {
        self.scale.elem_count()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let y = candle_nn::ops::rms_norm(&x32.contiguous()?, &self.scale, self.eps)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub activation: Activation,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_many([&self.gate, &self.up], x)?;
        let h = match self.activation {
            Activation::Silu => crate::cpu_ops::silu_mul(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
            Activation::Gelu => (gate.gelu_erf()? * up)?,
        };
        self.down.forward(&h)
    }
}

/// Inverse frequencies for one RoPE configuration, computed in f32 with
/// the same operations as `transformers`' `_compute_*_parameters`, so that
/// angles agree to the last bit where possible.
pub fn inverse_frequencies(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let base = rope.theta as f32;
    if let RopeScaling::LongRope { short, .. } = &rope.scaling {
        return longrope_frequencies(base, short, head_dim);
    }
    let mut inv: Vec<f32> = (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
        .collect();
    match rope.scaling {
        RopeScaling::None => {}
        // Handled above.
        RopeScaling::LongRope { .. } => {}
        RopeScaling::Factors(ref factors) => {
            for (f, d) in inv.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        RopeScaling::Linear { factor } => {
            for f in &mut inv {
                *f /= factor as f32;
            }
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            // transformers' _compute_yarn_parameters: the dimension at which
            // a frequency makes `rotations` turns over the original context.
            let dim = head_dim as f64;
            let correction = |rotations: f64| {
                dim * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI))
                    .ln()
                    / (2.0 * rope.theta.ln())
            };
            let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
            if low == high {
                high += 0.001;
            }
            let factor = factor as f32;
            for (i, f) in inv.iter_mut().enumerate() {
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                let extrapolated = *f;
                let interpolated = 1.0 / (factor * base.powf(2.0 * i as f32 / head_dim as f32));
                *f = interpolated * (1.0 - keep) + extrapolated * keep;
            }
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old_ctx) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old_ctx / low;
            let high_freq_wavelen = old_ctx / high;
            for f in &mut inv {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_freq_wavelen {
                    *f /= factor;
                } else if wavelen >= high_freq_wavelen {
                    // Between the two bands: interpolate smoothly.
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    inv
}

/// LongRoPE's frequencies: `1 / (factor · base^(i / dim))`, in f32 in
/// transformers' order of operations.
fn longrope_frequencies(base: f32, factors: &[f32], head_dim: usize) -> Vec<f32> {
    (0..head_dim)
        .step_by(2)
        .zip(factors)
        .map(|(i, &f)| 1.0 / (f * base.powf(i as f32 / head_dim as f32)))
        .collect()
}

/// Rotary embedding for one frequency set, applied at arbitrary positions.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// LongRoPE's frequencies from this position on.
    long: Option<(usize, Vec<f32>)>,
    /// YaRN's or LongRoPE's attention factor, applied to cos and sin (1
    /// otherwise).
    scale: f32,
}

impl RotaryEmbedding {
    pub fn new(rope: &Rope, head_dim: usize) -> Self {
        let scale = match rope.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            }
            | RopeScaling::LongRope {
                attention_factor, ..
            } => attention_factor as f32,
            _ => 1.0,
        };
        let long = match &rope.scaling {
            RopeScaling::LongRope {
                long,
                original_max_position_embeddings,
                ..
            } => Some((
                *original_max_position_embeddings,
                longrope_frequencies(rope.theta as f32, long, head_dim),
            )),
            _ => None,
        };
        RotaryEmbedding {
            inv_freq: inverse_frequencies(rope, head_dim),
            long,
            scale,
        }
    }

    /// `cos` and `sin` tables `[tokens, 1, head_dim / 2]` for the positions.
    pub fn tables(
        &self,
        positions: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let freqs = match &self.long {
                Some((from, long)) if p >= *from => long,
                _ => &self.inv_freq,
            };
            for &f in freqs {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.scale);
                sin.push(angle.sin() * self.scale);
            }
        }
        let shape = (positions.len(), 1, half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Rotates `x` (`[tokens, heads, head_dim]`) by per-token angles, with the
/// half-split ("rotate_half") layout Hugging Face checkpoints use.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (t, h, d) = x.dims3()?;
    // candle's kernel takes (batch, heads, seq, dim) with per-batch tables:
    // each token is its own batch entry so each can have its own position.
    let x4 = x.reshape((t, h, 1, d))?.contiguous()?;
    let y = candle_nn::rotary_emb::rope(&x4, cos, sin)?;
    Ok(y.reshape((t, h, d))?)
}

/// `tanh(x / cap) * cap`.
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    Ok(((x / cap)?.tanh()? * cap)?)
}

/// Embedding lookup that keeps the table for reuse as a tied `lm_head`.
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Tensor,
}

impl Embedding {
    pub fn new(table: Tensor) -> Self {
        Embedding { table }
    }

    pub fn table(&self) -> &Tensor {
        &self.table
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(
            candle_nn::Embedding::new(self.table.clone(), self.table.dim(D::Minus1)?)
                .forward(ids)?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_at_position_zero_is_identity_and_rotates_later() -> Result<()> {
        let rope = RotaryEmbedding::new(
            &Rope {
                theta: 10_000.0,
                scaling: RopeScaling::None,
            },
            4,
        );
        let dev = Device::Cpu;
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]], [[1., 2., 3., 4.]]], &dev)?;
        let (cos, sin) = rope.tables(&[0, 1], DType::F32, &dev)?;
        let y = apply_rope(&x, &cos, &sin)?.to_vec3::<f32>()?;
        assert_eq!(y[0][0], vec![1., 2., 3., 4.]);
        // Position 1, pair (x0, x2) rotated by 1 radian.
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((y[1][0][0] - (1. * c - 3. * s)).abs() < 1e-6);
        assert!((y[1][0][2] - (3. * c + 1. * s)).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn llama3_scaling_divides_low_frequencies_only() {
        let plain = Rope {
            theta: 500_000.0,
            scaling: RopeScaling::None,
        };
        let scaled = Rope {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let a = inverse_frequencies(&plain, 128);
        let b = inverse_frequencies(&scaled, 128);
        assert_eq!(a[0], b[0], "the highest frequency is untouched");
        assert!(
            (a[63] / b[63] - 8.0).abs() < 1e-4,
            "the lowest is divided by the factor"
        );
    }
}
