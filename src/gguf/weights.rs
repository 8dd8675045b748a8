//! A GGUF file's tensors under the decoder's Hugging Face names.
//!
//! llama.cpp's converter renames every tensor (`model.layers.0.self_attn.
//! q_proj.weight` → `blk.0.attn_q.weight`, gguf-py's `tensor_mapping.py`)
//! and changes two kinds of values, both undone here so the decoder sees a
//! Hugging Face checkpoint:
//!
//! - for the `llama` architecture it permutes the rows of Q and K within
//!   each head (`LlamaModel.permute`: the two rotary halves interleaved, the
//!   layout of Meta's original checkpoints, which llama.cpp's rotary kernel
//!   expects). The decoder rotates Hugging Face's half-split layout, so the
//!   rows are put back. Whole rows move, so a quantized matrix is permuted
//!   block row by block row without dequantizing.
//! - for Gemma it stores each norm's `1 + w` (Gemma's RMSNorm multiplies by
//!   `1 + w`; llama.cpp's by its weight). The decoder adds the 1 itself, so
//!   it is subtracted again; for the f32 norms the converter writes, this
//!   gives back the stored value exactly when the decoder adds 1.
//!
//! Projections in a format taper's CPU kernels run (Q8_0, Q4_0, Q4_K, Q6_K)
//! are handed to the decoder as [`QMatrix`], their blocks adopted as stored
//! (`QMatrix::from_ggml_bytes`) without a dense copy; tables it looks rows
//! up in (the embeddings) and weights in other formats are dequantized
//! through candle.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::gguf::{type_name, GgufFile, TensorEntry};
use crate::quant::{QMatrix, Quant};
use crate::weights::TensorSource;
use crate::{Error, Result};

/// What the converter did to a tensor, to be undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    None,
    /// Llama's Q or K: rows interleaved within each of `heads` heads.
    Unpermute {
        heads: usize,
    },
    /// Gemma's norms: stored as `1 + w`.
    MinusOne,
}

/// The bytes of one tensor, or of one expert's slice of a merged one.
struct Part<'a> {
    entry: &'a TensorEntry,
    bytes: &'a [u8],
    /// Row-major, as the decoder asks for it.
    shape: Vec<usize>,
    /// Whether nothing of the entry is read after this part.
    last: bool,
}

/// `(layer, expert, GGUF name)` for an expert's projection:
/// `model.layers.{l}.mlp.experts.{e}.gate_proj.weight` (Qwen-MoE) or
/// `model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight` (Mixtral) is
/// expert `e` of llama.cpp's `blk.{l}.ffn_gate_exps.weight`.
fn expert_name(hf: &str) -> Option<(usize, usize, &'static str)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest
        .strip_prefix("mlp.experts.")
        .or_else(|| rest.strip_prefix("block_sparse_moe.experts."))?;
    let (expert, rest) = rest.split_once('.')?;
    let name = match rest.strip_suffix(".weight")? {
        "gate_proj" | "w1" => "ffn_gate_exps",
        "up_proj" | "w3" => "ffn_up_exps",
        "down_proj" | "w2" => "ffn_down_exps",
        _ => return None,
    };
    Some((layer.parse().ok()?, expert.parse().ok()?, name))
}

/// A [`GgufFile`]'s tensors as a [`TensorSource`] for one model config.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    arch: Architecture,
    num_heads: usize,
    num_kv_heads: usize,
    sandwich_norms: bool,
}

impl<'a> GgufWeights<'a> {
    pub fn new(file: &'a GgufFile, config: &ModelConfig) -> Self {
        GgufWeights {
            file,
            arch: config.architecture,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            sandwich_norms: config.sandwich_norms,
        }
    }

    /// The GGUF name of a Hugging Face tensor name, what to undo, and for
    /// an expert's projection its index in llama.cpp's merged 3-D tensor.
    fn locate(&self, hf: &str) -> Option<(String, Fix, Option<usize>)> {
        if let Some((layer, expert, name)) = expert_name(hf) {
            return Some((
                format!("blk.{layer}.{name}.weight"),
                Fix::None,
                Some(expert),
            ));
        }
        let gemma = matches!(self.arch, Architecture::Gemma2 | Architecture::Gemma3);
        let norm_fix = if gemma { Fix::MinusOne } else { Fix::None };
        let top = match hf {
            "model.embed_tokens.weight" => Some(("token_embd.weight".to_string(), Fix::None)),
            "model.norm.weight" => Some(("output_norm.weight".to_string(), norm_fix)),
            "lm_head.weight" => Some(("output.weight".to_string(), Fix::None)),
            _ => None,
        };
        if let Some((name, fix)) = top {
            return Some((name, fix, None));
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let permuted = matches!(self.arch, Architecture::Llama | Architecture::Mixtral);
        let (name, fix) = match module {
            "input_layernorm" => ("attn_norm", norm_fix),
            "self_attn.q_proj" if permuted => (
                "attn_q",
                Fix::Unpermute {
                    heads: self.num_heads,
                },
            ),
            "self_attn.k_proj" if permuted => (
                "attn_k",
                Fix::Unpermute {
                    heads: self.num_kv_heads,
                },
            ),
            "self_attn.q_proj" => ("attn_q", Fix::None),
            "self_attn.k_proj" => ("attn_k", Fix::None),
            "self_attn.v_proj" => ("attn_v", Fix::None),
            "self_attn.o_proj" => ("attn_output", Fix::None),
            "self_attn.qkv_proj" => ("attn_qkv", Fix::None),
            "self_attn.q_norm" => ("attn_q_norm", norm_fix),
            "self_attn.k_norm" => ("attn_k_norm", norm_fix),
            // Llama's norm before the MLP; Gemma's norm after attention.
            "post_attention_layernorm" if self.sandwich_norms => ("post_attention_norm", norm_fix),
            "post_attention_layernorm" | "pre_feedforward_layernorm" => ("ffn_norm", norm_fix),
            "post_feedforward_layernorm" => ("post_ffw_norm", norm_fix),
            "mlp.gate_proj" => ("ffn_gate", Fix::None),
            "mlp.up_proj" => ("ffn_up", Fix::None),
            "mlp.down_proj" => ("ffn_down", Fix::None),
            // Phi-3's fused gate and up stay fused, as `ffn_up`.
            "mlp.gate_up_proj" => ("ffn_up", Fix::None),
            // The router.
            "mlp.gate" | "block_sparse_moe.gate" => ("ffn_gate_inp", Fix::None),
            _ => return None,
        };
        Some((format!("blk.{layer}.{name}.{suffix}"), fix, None))
    }

    /// The entry for a Hugging Face name, its shape checked: for an expert's
    /// projection, its slice of the merged `[experts, rows, cols]` tensor.
    fn entry(&self, hf: &str, shape: &[usize]) -> Result<(String, Part<'a>, Fix)> {
        let missing = |gguf: &str| Error::MissingTensor {
            name: format!("{gguf} ({hf})"),
            files: self.file.path().display().to_string(),
        };
        let (gguf, fix, expert) = self.locate(hf).ok_or_else(|| missing("no GGUF name"))?;
        let entry = self.file.tensor(&gguf).ok_or_else(|| missing(&gguf))?;
        let bad_shape = |expected: Vec<usize>| Error::TensorShape {
            name: gguf.clone(),
            path: self.file.path().to_path_buf(),
            found: entry.shape.clone(),
            expected,
        };
        let part = match expert {
            None if entry.shape == shape => Part {
                entry,
                bytes: self.file.bytes(entry),
                shape: entry.shape.clone(),
                last: true,
            },
            None => return Err(bad_shape(shape.to_vec())),
            Some(e) => {
                let experts = entry.shape.first().copied().unwrap_or(0);
                if entry.shape.len() != 3 || entry.shape[1..] != *shape || e >= experts {
                    let mut expected = vec![e + 1];
                    expected.extend_from_slice(shape);
                    return Err(bad_shape(expected));
                }
                // Experts are stored one after the other, each whole blocks.
                let all = self.file.bytes(entry);
                let size = all.len() / experts;
                Part {
                    entry,
                    bytes: &all[e * size..(e + 1) * size],
                    shape: shape.to_vec(),
                    last: e + 1 == experts,
                }
            }
        };
        Ok((gguf, part, fix))
    }

    fn unsupported(&self, name: &str, dtype: GgmlDType) -> Error {
        Error::GgufTensorType {
            name: name.to_string(),
            path: self.file.path().to_path_buf(),
            dtype: type_name(dtype).to_string(),
        }
    }

    /// The tensor on the CPU, in its file dtype if that is a float type,
    /// else dequantized to f32; with `fix` undone.
    fn dense(&self, name: &str, part: &Part<'_>, fix: Fix) -> Result<Tensor> {
        let (entry, bytes) = (part.entry, part.bytes);
        let shape = part.shape.as_slice();
        let cpu = &Device::Cpu;
        let t = match entry.dtype {
            GgmlDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, shape, cpu)?,
            GgmlDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, shape, cpu)?,
            GgmlDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, shape, cpu)?,
            GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K => {
                ggml_file::qtensor_from_ggml(entry.dtype, bytes, shape.to_vec(), cpu)?
                    .dequantize(cpu)?
            }
            // llama.cpp's intermediate types for activations; never weights.
            GgmlDType::Q8_1 | GgmlDType::Q8K => return Err(self.unsupported(name, entry.dtype)),
        };
        Ok(match fix {
            Fix::None => t,
            Fix::MinusOne => t.to_dtype(DType::F32)?.affine(1.0, -1.0)?,
            Fix::Unpermute { heads } => unpermute_tensor(&t, heads)?,
        })
    }
}

impl TensorSource for GgufWeights<'_> {
    fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (gguf, part, fix) = self.entry(name, shape)?;
        let t = self
            .dense(&gguf, &part, fix)?
            .to_dtype(dtype)?
            .to_device(device)?;
        if part.last {
            self.file.release(part.entry);
        }
        Ok(t)
    }

    fn load_quantized(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
    ) -> Result<Option<QMatrix>> {
        let (gguf, part, fix) = self.entry(name, shape)?;
        let entry = part.entry;
        let [n_rows, cols] = part.shape[..] else {
            return Ok(None);
        };
        if rows.end > n_rows || rows.start > rows.end {
            return Err(Error::InvalidRequest(format!(
                "rows {rows:?} of '{gguf}', which has {n_rows}"
            )));
        }
        let Some(format) = kernel_format(entry.dtype) else {
            let Some(target) = requantize_format(entry.dtype) else {
                // Dense in the file: the caller loads it (and quantizes it
                // if asked to).
                return Ok(None);
            };
            // A format without kernels of ours (Q5_0 and friends, which
            // llama.cpp's Q4_K_M uses for rows that are not whole 256-blocks,
            // e.g. all of Qwen2.5-0.5B's 896-wide projections): stored again
            // in a format with kernels and at least its precision, instead of
            // dense f32, which would read 4-6x the bytes per token.
            let dense = self.dense(&gguf, &part, fix)?;
            let rows_part = dense.narrow(0, rows.start, rows.len())?.contiguous()?;
            let q = crate::quant::quantize_tensor(&rows_part, target)?;
            if rows.end == n_rows && part.last {
                self.file.release(entry);
            }
            return Ok(Some(q));
        };
        let row_bytes = cols / entry.dtype.block_size() * entry.dtype.type_size();
        let bytes = match fix {
            Fix::Unpermute { heads } => {
                Cow::Owned(unpermute_rows(part.bytes, n_rows, row_bytes, heads)?)
            }
            Fix::None => Cow::Borrowed(part.bytes),
            Fix::MinusOne => {
                return Err(Error::InvalidRequest(format!(
                    "'{gguf}' is a norm, not a projection"
                )))
            }
        };
        let selected = &bytes[rows.start * row_bytes..rows.end * row_bytes];
        let q = QMatrix::from_ggml_bytes(format, selected, rows.len(), cols)?;
        // The last part of a fused tensor (and the last expert of a merged
        // one) releases the whole of it.
        if rows.end == n_rows && part.last {
            self.file.release(entry);
        }
        Ok(Some(q))
    }
}

/// The `quant` format whose CPU kernels run a ggml type as stored.
fn kernel_format(dtype: GgmlDType) -> Option<Quant> {
    Some(match dtype {
        GgmlDType::Q8_0 => Quant::Q8_0,
        GgmlDType::Q6K => Quant::Q6K,
        GgmlDType::Q4K => Quant::Q4K,
        GgmlDType::Q4_0 => Quant::Q4_0,
        _ => return None,
    })
}

/// The format a quantized ggml type without kernels of ours is stored in:
/// Q8_0 for the 4.5–5.5-bit types (nearly lossless), Q4_K for the 2–3-bit
/// K-quants (more bits than they have).
fn requantize_format(dtype: GgmlDType) -> Option<Quant> {
    Some(match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => Quant::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => Quant::Q4K,
        _ => return None,
    })
}

/// HF row `r` of a head (`r = j·half + i`, `j` the rotary half) is GGUF row
/// `2i + j` of the same head.
fn gguf_row(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (r / head_dim, r % head_dim);
    let (j, i) = (within / half, within % half);
    head * head_dim + 2 * i + j
}

fn head_dim_of(rows: usize, heads: usize) -> Result<usize> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::InvalidRequest(format!(
            "{rows} rows do not split into {heads} heads of an even size"
        )));
    }
    Ok(rows / heads)
}

/// Undoes `LlamaModel.permute` on whole rows of `row_bytes` bytes each.
fn unpermute_rows(bytes: &[u8], rows: usize, row_bytes: usize, heads: usize) -> Result<Vec<u8>> {
    let head_dim = head_dim_of(rows, heads)?;
    let mut out = Vec::with_capacity(bytes.len());
    for r in 0..rows {
        let g = gguf_row(r, head_dim);
        out.extend_from_slice(&bytes[g * row_bytes..(g + 1) * row_bytes]);
    }
    Ok(out)
}

/// Undoes `LlamaModel.permute` on a dense weight `[rows, cols]` or bias
/// `[rows]`: `[heads, half, 2, rest]` back to `[heads, 2, half, rest]`.
fn unpermute_tensor(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    let head_dim = head_dim_of(rows, heads)?;
    let rest = t.elem_count() / rows.max(1);
    Ok(t.reshape((heads, head_dim / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// `LlamaModel.permute` itself, on row indices.
    fn permute(rows: &[usize], heads: usize) -> Vec<usize> {
        let hd = rows.len() / heads;
        let mut out = Vec::new();
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    out.push(rows[h * hd + j * hd / 2 + i]);
                }
            }
        }
        out
    }

    /// Every quantized format with kernels of ours is adopted as stored:
    /// its blocks, dequantized by taper, are candle's dequantization of the
    /// same bytes, with Llama's Q/K rows put back the same way on both
    /// paths (bytes for the quantized one, f32 rows for the dense one).
    #[test]
    fn adopted_blocks_dequantize_as_candle_does() -> Result<()> {
        use candle_core::quantized::{gguf_file, QTensor};
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
        let llama = GgufFile::open(&fixtures.join("llama-f32.gguf"))?;
        let config = crate::gguf::model_config(&llama)?;
        assert_eq!((config.num_heads, config.num_kv_heads), (4, 2));

        // (HF name, GGUF name, type, rows): Q has 4 heads of 4 rows, K 2.
        let cases = [
            (
                "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_q.weight",
                GgmlDType::Q4K,
                16,
            ),
            (
                "model.layers.0.self_attn.k_proj.weight",
                "blk.0.attn_k.weight",
                GgmlDType::Q6K,
                8,
            ),
            (
                "model.layers.0.self_attn.v_proj.weight",
                "blk.0.attn_v.weight",
                GgmlDType::Q4_0,
                8,
            ),
            (
                "model.layers.0.mlp.up_proj.weight",
                "blk.0.ffn_up.weight",
                GgmlDType::Q8_0,
                5,
            ),
        ];
        let cols = 512;
        let cpu = &Device::Cpu;
        let tensors = cases
            .iter()
            .map(|&(_, gguf, dtype, rows)| {
                let w = Tensor::randn(0f32, 1.0, (rows, cols), cpu)?;
                Ok((gguf, QTensor::quantize(&w, dtype)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("k.gguf");
        let mut out = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        gguf_file::write(&mut out, &[], &refs)?;
        drop(out);

        let file = GgufFile::open(&path)?;
        let weights = GgufWeights::new(&file, &config);
        for (hf, _, dtype, rows) in cases {
            let shape = [rows, cols];
            let q = weights
                .load_quantized(hf, &shape, 0..rows)?
                .ok_or_else(|| Error::InvalidRequest(format!("{hf} was not adopted")))?;
            assert_eq!(Some(q.format()), kernel_format(dtype), "{hf}");
            let ours = Tensor::from_vec(q.dequantize(), (rows, cols), cpu)?;
            let candle = weights.load(hf, &shape, DType::F32, cpu)?;
            let d = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-6, "{hf}: {d}");
            // A part of the rows is those rows.
            let part = weights.load_quantized(hf, &shape, 2..rows)?;
            let part = part.map(|p| p.dequantize()).unwrap_or_default();
            assert_eq!(part.len(), (rows - 2) * cols, "{hf}");
        }
        Ok(())
    }

    #[test]
    fn unpermuting_inverts_the_converters_permutation() -> Result<()> {
        let rows: Vec<usize> = (0..24).collect();
        let stored = permute(&rows, 3);
        // As bytes, one byte per row.
        let bytes: Vec<u8> = stored.iter().map(|&r| r as u8).collect();
        let back = unpermute_rows(&bytes, 24, 1, 3)?;
        assert_eq!(back, rows.iter().map(|&r| r as u8).collect::<Vec<_>>());
        // As a tensor of two columns, and as a bias.
        let w: Vec<f32> = stored
            .iter()
            .flat_map(|&r| [r as f32, -(r as f32)])
            .collect();
        let t = unpermute_tensor(&Tensor::from_vec(w, (24, 2), &Device::Cpu)?, 3)?;
        let col: Vec<f32> = t.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        assert_eq!(col, rows.iter().map(|&r| r as f32).collect::<Vec<_>>());
        let b: Vec<f32> = stored.iter().map(|&r| r as f32).collect();
        let t = unpermute_tensor(&Tensor::from_vec(b, 24, &Device::Cpu)?, 3)?;
        assert_eq!(t.to_vec1::<f32>()?, col);
        assert!(unpermute_rows(&bytes, 24, 1, 5).is_err());
        Ok(())
    }
}
