//! Weight quantization for CPU inference: `--quant q8_0 | q6_k | q4_k | q4_0`.
//!
//! Owns the weight formats, each with llama.cpp's numbers so that GGUF
//! files can be adopted as they are ([`QMatrix::from_ggml_bytes`]):
//!
//! - Q8_0 ([`Q8Matrix`]): blocks of 32 int8 weights sharing one f16 scale
//!   `d = max|x| / 127`; 8.5 bits a weight.
//! - Q6_K ([`Q6KMatrix`]): super-blocks of 256, 6-bit integers, an int8
//!   scale per 16; 6.5625 bits.
//! - Q4_K ([`Q4KMatrix`]): super-blocks of 256, 4-bit integers, a 6-bit
//!   scale and minimum per 32; 4.5 bits.
//! - Q4_0 ([`Q40Matrix`]): blocks of 32 4-bit integers with an f16 scale;
//!   4.5 bits.
//!
//! and the products with activations quantized on the fly to 8 bits: Q8_0
//! in `q8_0.rs` with its own kernels ([`kernels`]), the other three in the
//! shared 128-weight unit layout of `unit.rs`. Kernels are chosen at run
//! time for the CPU at hand (AVX-512 VNNI, AVX2, or portable scalar code)
//! and spread over rayon's global pool.
//!
//! Talks to nobody but candle's CPU tensors: `models::layers::Linear` holds a
//! [`QMatrix`] instead of a dense weight when the model is loaded with a
//! [`Quant`], quantizing each tensor right after it is read so the dense
//! copy of every weight never exists at once.

pub mod kernels;
mod q4_0;
mod q4_k;
mod q6_k;
mod q8_0;
mod unit;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Storage, Tensor};

pub use kernels::Kernel;
pub use q4_0::{Q40Matrix, Q4_0_BLOCK_BYTES, QK4_0};
pub use q4_k::{Q4KMatrix, Q4_K_BLOCK_BYTES, QK_K};
pub use q6_k::{Q6KMatrix, Q6_K_BLOCK_BYTES};
pub use q8_0::{matmul_many, Q8Activations, Q8Matrix, Q8_0_BLOCK_BYTES, QK8_0};
use unit::UnitFormat;
pub use unit::{ActScale, UnitActs, UNIT};

use crate::{Error, Result};

/// How the linear projections' weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quant {
    /// Dense, in the model's dtype.
    #[default]
    None,
    /// 8-bit blocks of 32 with an f16 scale; CPU only.
    Q8_0,
    /// 6-bit super-blocks of 256 (llama.cpp's Q6_K); CPU only.
    Q6K,
    /// 4-bit super-blocks of 256 with scales and minimums per 32
    /// (llama.cpp's Q4_K); CPU only.
    Q4K,
    /// 4-bit blocks of 32 with an f16 scale (llama.cpp's Q4_0); CPU only.
    Q4_0,
}

impl FromStr for Quant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "no" | "off" => Ok(Self::None),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q6_k" | "q6k" => Ok(Self::Q6K),
            "q4_k" | "q4k" => Ok(Self::Q4K),
            "q4_0" => Ok(Self::Q4_0),
            other => Err(Error::Device(format!(
                "--quant '{other}' is not one of none, q8_0, q6_k, q4_k, q4_0"
            ))),
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Q8_0 => "q8_0",
            Self::Q6K => "q6_k",
            Self::Q4K => "q4_k",
            Self::Q4_0 => "q4_0",
        })
    }
}

impl Quant {
    /// The format for the output head when the projections use `self`.
    ///
    /// The 4-bit formats keep the head in Q6_K, as llama.cpp's quantizer
    /// does for its 4-bit types (Q4_K_M, Q4_0): the head's errors go
    /// straight into the logits, and with a large vocabulary it is the one
    /// product worth two more bits. (llama.cpp also gives some layers'
    /// `attn_v` and `ffn_down` Q6_K in Q4_K_M; taper keeps every other
    /// projection in the chosen format.)
    pub fn for_head(self) -> Quant {
        match self {
            Quant::Q4K | Quant::Q4_0 => Quant::Q6K,
            q => q,
        }
    }

    /// The format stored under ggml type id `id` (as in GGUF's tensor
    /// infos), for the types taper runs quantized.
    pub fn from_ggml_type(id: u32) -> Option<Quant> {
        match id {
            2 => Some(Quant::Q4_0),
            8 => Some(Quant::Q8_0),
            12 => Some(Quant::Q4K),
            14 => Some(Quant::Q6K),
            _ => None,
        }
    }

    /// ggml's block of this format: (weights, bytes).
    pub fn ggml_block(self) -> Option<(usize, usize)> {
        match self {
            Quant::None => None,
            Quant::Q8_0 => Some((QK8_0, Q8_0_BLOCK_BYTES)),
            Quant::Q6K => Some((QK_K, Q6_K_BLOCK_BYTES)),
            Quant::Q4K => Some((QK_K, Q4_K_BLOCK_BYTES)),
            Quant::Q4_0 => Some((QK4_0, Q4_0_BLOCK_BYTES)),
        }
    }
}

/// Checks that `len` bytes are a `[rows, cols]` tensor of ggml blocks of
/// `block` weights in `block_bytes` bytes; returns the blocks per row.
pub(crate) fn check_ggml(
    format: &str,
    len: usize,
    rows: usize,
    cols: usize,
    block: usize,
    block_bytes: usize,
) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Err(Error::Quant(format!(
            "a {format} tensor of shape [{rows}, {cols}] is empty"
        )));
    }
    if !cols.is_multiple_of(block) {
        return Err(Error::Quant(format!(
            "a {format} tensor's rows must be whole blocks of {block} weights, but they have {cols}"
        )));
    }
    let blocks = cols / block;
    let want = rows
        .checked_mul(blocks)
        .and_then(|n| n.checked_mul(block_bytes));
    if want != Some(len) {
        let want = want.map_or_else(|| "more than usize::MAX".into(), |n| n.to_string());
        return Err(Error::Quant(format!(
            "a {format} tensor of shape [{rows}, {cols}] takes {want} bytes ({block_bytes} per {block} weights), but {len} were given"
        )));
    }
    Ok(blocks)
}

/// Checks that rows of width `other` can follow rows of width `cols`.
fn check_append(cols: usize, other: usize) -> Result<()> {
    if cols != other {
        return Err(Error::InvalidRequest(format!(
            "cannot append rows of {other} values to a matrix of rows of {cols}"
        )));
    }
    Ok(())
}

/// Appends `src` (whole rows of `per_row` elements) to `dst`, reserving
/// room for `more_rows` further rows in the same allocation.
fn extend_rows<T: Clone>(dst: &mut Vec<T>, src: &[T], per_row: usize, more_rows: usize) {
    dst.reserve_exact(src.len() + more_rows * per_row);
    dst.extend_from_slice(src);
}

/// What a quantized product on another device says.
const CPU_ONLY: &str =
    "quantized weights (--quant) run on the CPU only for now: use --device cpu, or --quant none on a GPU";

/// Runs `f` on the values of `t` as one contiguous f32 slice on the CPU,
/// converting (and copying) only when `t` is not already that.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if !t.device().is_cpu() {
        return Err(Error::Device(CPU_ONLY.into()));
    }
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Device(CPU_ONLY.into()));
    };
    let start = layout.start_offset();
    let data = &cpu.as_slice::<f32>()?[start..start + t.elem_count()];
    Ok(f(data))
}

/// Checks that `len` values are a non-empty `[rows, cols]` matrix, before
/// any format quantizes them.
fn check_dense(len: usize, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 || len != rows * cols {
        return Err(Error::InvalidRequest(format!(
            "cannot quantize {len} values as a [{rows}, {cols}] matrix"
        )));
    }
    Ok(())
}

/// A quantized `[out, in]` weight in one of the supported formats.
///
/// Every format offers the same things: its shape, its size in memory,
/// `x · Wᵀ` on f32 rows, a dense copy for tests, and ggml's bytes in and
/// out.
#[derive(Debug)]
pub enum QMatrix {
    Q8_0(Q8Matrix),
    Q6K(Q6KMatrix),
    Q4K(Q4KMatrix),
    Q4_0(Q40Matrix),
}

/// Runs `$body` with `$q` bound to the matrix inside any variant.
macro_rules! each {
    ($m:expr, $q:ident => $body:expr) => {
        match $m {
            QMatrix::Q8_0($q) => $body,
            QMatrix::Q6K($q) => $body,
            QMatrix::Q4K($q) => $body,
            QMatrix::Q4_0($q) => $body,
        }
    };
}

impl QMatrix {
    /// Quantizes row-major `[rows, cols]` f32 values into `quant`'s format.
    pub fn quantize(quant: Quant, data: &[f32], rows: usize, cols: usize) -> Result<QMatrix> {
        Ok(match quant {
            Quant::Q8_0 => QMatrix::Q8_0(Q8Matrix::quantize(data, rows, cols)?),
            Quant::Q6K => QMatrix::Q6K(Q6KMatrix::quantize(data, rows, cols)?),
            Quant::Q4K => QMatrix::Q4K(Q4KMatrix::quantize(data, rows, cols)?),
            Quant::Q4_0 => QMatrix::Q4_0(Q40Matrix::quantize(data, rows, cols)?),
            Quant::None => {
                return Err(Error::InvalidRequest(
                    "quantizing needs a quantized format, not 'none'".into(),
                ))
            }
        })
    }

    /// Adopts a `[rows, cols]` tensor stored as ggml blocks of `format`
    /// (GGUF's layout: `rows` = ggml's `ne[1]`, `cols` = `ne[0]`, rows of
    /// whole blocks one after another). The bytes are converted into
    /// taper's layout for that format; the numbers are kept exactly.
    pub fn from_ggml_bytes(
        format: Quant,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix> {
        Ok(match format {
            Quant::Q8_0 => QMatrix::Q8_0(Q8Matrix::from_ggml_bytes(bytes, rows, cols)?),
            Quant::Q6K => QMatrix::Q6K(Q6KMatrix::from_ggml_bytes(bytes, rows, cols)?),
            Quant::Q4K => QMatrix::Q4K(Q4KMatrix::from_ggml_bytes(bytes, rows, cols)?),
            Quant::Q4_0 => QMatrix::Q4_0(Q40Matrix::from_ggml_bytes(bytes, rows, cols)?),
            Quant::None => {
                return Err(Error::Quant(
                    "ggml bytes need a quantized format, not 'none'".into(),
                ))
            }
        })
    }

    /// The matrix as ggml blocks (the inverse of [`Self::from_ggml_bytes`]);
    /// an error when a row is not whole ggml blocks (taper pads rows of any
    /// length, ggml does not).
    pub fn to_ggml_bytes(&self) -> Result<Vec<u8>> {
        each!(self, q => q.to_ggml_bytes())
    }

    pub fn rows(&self) -> usize {
        each!(self, q => q.rows())
    }

    pub fn cols(&self) -> usize {
        each!(self, q => q.cols())
    }

    /// Bytes of quantized blocks and scales.
    pub fn size_bytes(&self) -> usize {
        each!(self, q => q.size_bytes())
    }

    /// The format's name, as `--quant` spells it.
    pub fn format(&self) -> Quant {
        match self {
            QMatrix::Q8_0(_) => Quant::Q8_0,
            QMatrix::Q6K(_) => Quant::Q6K,
            QMatrix::Q4K(_) => Quant::Q4K,
            QMatrix::Q4_0(_) => Quant::Q4_0,
        }
    }

    /// `x · Wᵀ` for `tokens` rows of `cols()` values: `tokens × rows()` f32.
    pub fn matmul(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        each!(self, q => q.matmul(x, tokens))
    }

    /// [`Self::matmul`] with a chosen kernel (for tests and benchmarks).
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        each!(self, q => q.matmul_with(kernel, x, tokens))
    }

    /// The products of several matrices of the same width with one input:
    /// one parallel pass per format among them (the input quantized once
    /// for the pass, the pool synchronised once), so a layer's q/k/v that a
    /// GGUF file stores in two formats (Q4_K_M's Q4_K and Q6_K) take two.
    pub fn matmul_many(mats: &[&QMatrix], x: &[f32], tokens: usize) -> Result<Vec<Vec<f32>>> {
        let kernel = Kernel::best();
        let mut outs: Vec<Option<Vec<f32>>> = vec![None; mats.len()];
        for format in [Quant::Q8_0, Quant::Q6K, Quant::Q4K, Quant::Q4_0] {
            let idx: Vec<usize> = (0..mats.len())
                .filter(|&i| mats[i].format() == format)
                .collect();
            macro_rules! pass {
                ($variant:ident, $run:path) => {{
                    let ms: Vec<_> = idx
                        .iter()
                        .filter_map(|&i| match mats[i] {
                            QMatrix::$variant(q) => Some(q),
                            _ => None,
                        })
                        .collect();
                    $run(kernel, &ms, x, tokens)?
                }};
            }
            let ys = match format {
                _ if idx.is_empty() => continue,
                Quant::Q8_0 => pass!(Q8_0, q8_0::matmul_many),
                Quant::Q6K => pass!(Q6K, unit::matmul_many),
                Quant::Q4K => pass!(Q4K, unit::matmul_many),
                Quant::Q4_0 => pass!(Q4_0, unit::matmul_many),
                Quant::None => continue,
            };
            for (i, y) in idx.into_iter().zip(ys) {
                outs[i] = Some(y);
            }
        }
        outs.into_iter()
            .map(|y| y.ok_or_else(|| Error::InvalidRequest("a product was not computed".into())))
            .collect()
    }

    /// Products of matrices each with its own input: matrix `i` reads
    /// `inputs[which[i]]` (`[tokens, cols]` f32). One parallel pass per
    /// format among the matrices (each input quantized once per format that
    /// reads it), so a mixture-of-experts layer's experts, each over the
    /// tokens routed to it, synchronise the pool once or twice instead of
    /// once per expert and projection.
    pub fn matmul_grouped(
        mats: &[&QMatrix],
        which: &[usize],
        inputs: &[(&[f32], usize)],
    ) -> Result<Vec<Vec<f32>>> {
        if mats.len() != which.len() || which.iter().any(|&j| j >= inputs.len()) {
            return Err(Error::InvalidRequest(format!(
                "a grouped product of {} matrices with {} input choices over {} inputs",
                mats.len(),
                which.len(),
                inputs.len()
            )));
        }
        for (m, &j) in mats.iter().zip(which) {
            let (x, tokens) = inputs[j];
            if x.len() != tokens * m.cols() {
                return Err(Error::InvalidRequest(format!(
                    "a {} projection of width {} got {} values for {tokens} tokens",
                    m.format(),
                    m.cols(),
                    x.len()
                )));
            }
        }
        let kernel = Kernel::best();
        let mut outs: Vec<Option<Vec<f32>>> = vec![None; mats.len()];
        for format in [Quant::Q8_0, Quant::Q6K, Quant::Q4K, Quant::Q4_0] {
            let idx: Vec<usize> = (0..mats.len())
                .filter(|&i| mats[i].format() == format)
                .collect();
            let sel: Vec<usize> = idx.iter().map(|&i| which[i]).collect();
            macro_rules! pass {
                ($variant:ident, $run:path) => {{
                    let ms: Vec<_> = idx
                        .iter()
                        .filter_map(|&i| match mats[i] {
                            QMatrix::$variant(q) => Some(q),
                            _ => None,
                        })
                        .collect();
                    $run(kernel, &ms, &sel, inputs)?
                }};
            }
            let ys = match format {
                _ if idx.is_empty() => continue,
                Quant::Q8_0 => pass!(Q8_0, q8_0::matmul_grouped),
                Quant::Q6K => pass!(Q6K, unit::matmul_grouped),
                Quant::Q4K => pass!(Q4K, unit::matmul_grouped),
                Quant::Q4_0 => pass!(Q4_0, unit::matmul_grouped),
                Quant::None => continue,
            };
            for (i, y) in idx.into_iter().zip(ys) {
                outs[i] = Some(y);
            }
        }
        outs.into_iter()
            .map(|y| y.ok_or_else(|| Error::InvalidRequest("a product was not computed".into())))
            .collect()
    }

    /// The weights as stored (dequantized), row-major `rows × cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        each!(self, q => q.dequantize())
    }

    /// Appends `other`'s rows (same format and width) after this matrix's,
    /// reserving room for `more` rows after them in one allocation.
    fn append_rows(&mut self, other: QMatrix, more: usize) -> Result<()> {
        match (self, other) {
            (QMatrix::Q8_0(a), QMatrix::Q8_0(b)) => a.append_rows(b, more),
            (QMatrix::Q6K(a), QMatrix::Q6K(b)) => a.append_rows(b, more),
            (QMatrix::Q4K(a), QMatrix::Q4K(b)) => a.append_rows(b, more),
            (QMatrix::Q4_0(a), QMatrix::Q4_0(b)) => a.append_rows(b, more),
            (a, b) => Err(Error::InvalidRequest(format!(
                "cannot append {} rows to a {} matrix",
                b.format(),
                a.format()
            ))),
        }
    }
}

/// Quantizes a dense `[out, in]` weight (any float dtype, on the CPU) into
/// `quant`'s format.
pub fn quantize_tensor(w: &Tensor, quant: Quant) -> Result<QMatrix> {
    let (rows, cols) = w.dims2()?;
    if quant == Quant::None {
        return Err(Error::InvalidRequest(
            "quantize_tensor needs a quantized format, not 'none'".into(),
        ));
    }
    with_f32_slice(w, |data| QMatrix::quantize(quant, data, rows, cols))?
}

/// [`quantize_tensor`] a block of rows at a time, each block widened to f32
/// on its own: a large weight held in bf16 (a tied head quantized from the
/// bf16 lookup table) is never copied whole in f32, which would double the
/// load's peak memory for a moment.
pub fn quantize_tensor_by_rows(w: &Tensor, quant: Quant) -> Result<QMatrix> {
    /// f32 bytes widened at once.
    const BLOCK_BYTES: usize = 16 << 20;
    let (_, cols) = w.dims2()?;
    quantize_rows_in_blocks(w, quant, (BLOCK_BYTES / (4 * cols.max(1))).max(1))
}

fn quantize_rows_in_blocks(w: &Tensor, quant: Quant, block: usize) -> Result<QMatrix> {
    let (rows, _) = w.dims2()?;
    let mut out: Option<QMatrix> = None;
    let mut r0 = 0;
    while r0 < rows {
        let n = block.min(rows - r0);
        let part = quantize_tensor(&w.narrow(0, r0, n)?, quant)?;
        r0 += n;
        match out.as_mut() {
            None => out = Some(part),
            Some(m) => m.append_rows(part, rows - r0)?,
        }
    }
    out.ok_or_else(|| Error::InvalidRequest("cannot quantize a matrix with no rows".into()))
}

/// `x · Wᵀ` for `x` of shape `[..., in]` on the CPU: `[..., out]` in `x`'s
/// dtype, computed through the quantized kernels.
pub fn matmul_tensor(w: &QMatrix, x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Err(Error::Device(CPU_ONLY.into()));
    }
    let dims = x.dims();
    let cols = dims.last().copied().unwrap_or(0);
    if cols != w.cols() {
        return Err(Error::InvalidRequest(format!(
            "a {} projection of width {} got input of shape {dims:?}",
            w.format(),
            w.cols()
        )));
    }
    let tokens = x.elem_count() / cols.max(1);
    let y = with_f32_slice(x, |data| w.matmul(data, tokens))??;
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = w.rows();
    }
    Ok(Tensor::from_vec(y, shape, &Device::Cpu)?.to_dtype(x.dtype())?)
}

/// [`matmul_tensor`] for several matrices of the same width over the same
/// `x`, in one parallel pass when they share a format (see
/// [`QMatrix::matmul_many`]).
pub fn matmul_tensor_many(ws: &[&QMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
    if !x.device().is_cpu() {
        return Err(Error::Device(CPU_ONLY.into()));
    }
    let dims = x.dims();
    let cols = dims.last().copied().unwrap_or(0);
    if let Some(w) = ws.iter().find(|w| w.cols() != cols) {
        return Err(Error::InvalidRequest(format!(
            "a {} projection of width {} got input of shape {dims:?}",
            w.format(),
            w.cols()
        )));
    }
    let tokens = x.elem_count() / cols.max(1);
    let ys = with_f32_slice(x, |data| QMatrix::matmul_many(ws, data, tokens))??;
    ys.into_iter()
        .zip(ws)
        .map(|(y, w)| {
            let mut shape = dims.to_vec();
            if let Some(last) = shape.last_mut() {
                *last = w.rows();
            }
            Ok(Tensor::from_vec(y, shape, &Device::Cpu)?.to_dtype(x.dtype())?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [Quant; 4] = [Quant::Q8_0, Quant::Q6K, Quant::Q4K, Quant::Q4_0];

    #[test]
    fn parses_quant_names() -> Result<()> {
        assert_eq!("none".parse::<Quant>()?, Quant::None);
        assert_eq!("Q8_0".parse::<Quant>()?, Quant::Q8_0);
        assert_eq!("q4k".parse::<Quant>()?, Quant::Q4K);
        assert_eq!("Q4_K".parse::<Quant>()?, Quant::Q4K);
        assert_eq!("q6k".parse::<Quant>()?, Quant::Q6K);
        assert_eq!("q6_k".parse::<Quant>()?, Quant::Q6K);
        assert_eq!("q4_0".parse::<Quant>()?, Quant::Q4_0);
        let err = "q5_k".parse::<Quant>().unwrap_err().to_string();
        for name in ["q5_k", "none", "q8_0", "q6_k", "q4_k", "q4_0"] {
            assert!(err.contains(name), "{err}");
        }
        for q in FORMATS {
            assert_eq!(q.to_string().parse::<Quant>()?, q);
            let (weights, bytes) = q.ggml_block().expect("a block");
            assert!(weights == 32 || weights == 256, "{q}: {bytes}");
        }
        assert_eq!(Quant::Q4K.to_string(), "q4_k");
        assert_eq!(Quant::Q4K.for_head(), Quant::Q6K);
        assert_eq!(Quant::Q8_0.for_head(), Quant::Q8_0);
        assert_eq!(Quant::from_ggml_type(12), Some(Quant::Q4K));
        assert_eq!(Quant::from_ggml_type(0), None);
        Ok(())
    }

    #[test]
    fn tensor_product_matches_candle_within_quantization_error() -> Result<()> {
        let dev = Device::Cpu;
        // Deterministic, roughly normal values (a sum of four uniforms).
        let normal = |n: usize, seed: u64, std: f32| -> Result<Tensor> {
            let mut s = seed.wrapping_mul(6364136223846793005) | 1;
            let mut uniform = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            };
            let v: Vec<f32> = (0..n)
                .map(|_| (uniform() + uniform() + uniform() + uniform()) * 0.87 * std)
                .collect();
            Ok(Tensor::from_vec(v, n, &dev)?)
        };
        let w = normal(48 * 256, 1, 0.05)?.reshape((48, 256))?;
        let x = normal(3 * 256, 2, 1.0)?.reshape((3, 256))?;
        let want = x.matmul(&w.t()?)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        // Largest error against the largest output: measured 0.7% (Q8_0),
        // 2.0% (Q6_K), 7.8% (Q4_K), 6.1% (Q4_0) on these values; the bounds
        // leave about twice that while catching a wrong scale or block
        // (errors of order 1).
        for (quant, bound) in FORMATS.into_iter().zip([0.015, 0.04, 0.15, 0.12]) {
            let q = quantize_tensor(&w, quant)?;
            assert_eq!(q.format(), quant);
            let y = matmul_tensor(&q, &x)?;
            assert_eq!(y.dims(), &[3, 48]);
            let err = (y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                err < bound * scale,
                "{quant}: error {err} against outputs up to {scale}"
            );
            // A non-contiguous input goes through a copy and gives the same rows.
            let xt = x.t()?.contiguous()?.t()?;
            let y2 = matmul_tensor(&q, &xt)?;
            assert_eq!(
                matmul_tensor(&q, &x)?.to_vec2::<f32>()?,
                y2.to_vec2::<f32>()?
            );
            // Several matrices in one pass give what each gives alone.
            let q2 = quantize_tensor(&normal(17 * 256, 3, 0.05)?.reshape((17, 256))?, quant)?;
            let both = matmul_tensor_many(&[&q, &q2], &x)?;
            assert_eq!(
                both[0].to_vec2::<f32>()?,
                matmul_tensor(&q, &x)?.to_vec2::<f32>()?
            );
            assert_eq!(
                both[1].to_vec2::<f32>()?,
                matmul_tensor(&q2, &x)?.to_vec2::<f32>()?
            );
            // A wrong width is an error naming both.
            let err = matmul_tensor(&q, &Tensor::zeros((1, 95), DType::F32, &dev)?)
                .unwrap_err()
                .to_string();
            assert!(err.contains("256") && err.contains("95"), "{err}");
        }
        // Mixed formats run one pass per format, each output in its place.
        let a = quantize_tensor(&w, Quant::Q4K)?;
        let b = quantize_tensor(&w, Quant::Q6K)?;
        let c = quantize_tensor(&w, Quant::Q8_0)?;
        let all = matmul_tensor_many(&[&a, &b, &c, &a], &x)?;
        for (y, m) in all.iter().zip([&a, &b, &c, &a]) {
            assert_eq!(y.to_vec2::<f32>()?, matmul_tensor(m, &x)?.to_vec2::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn quantizing_by_blocks_of_rows_gives_the_whole_matrix() -> Result<()> {
        let dev = Device::Cpu;
        // 11 rows of a width that is not whole super-blocks (the padded
        // last unit must land in the right row after appending).
        let (rows, cols) = (11, 300);
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05)
            .collect();
        let w = Tensor::from_vec(v, (rows, cols), &dev)?.to_dtype(DType::BF16)?;
        let x = Tensor::from_vec(
            (0..2 * cols)
                .map(|i| (i % 13) as f32 - 6.0)
                .collect::<Vec<_>>(),
            (2, cols),
            &dev,
        )?;
        for quant in FORMATS {
            let whole = quantize_tensor(&w, quant)?;
            for block in [1, 3, 4, 11, 64] {
                let parts = quantize_rows_in_blocks(&w, quant, block)?;
                assert_eq!((parts.rows(), parts.cols()), (rows, cols), "{quant}");
                assert_eq!(parts.size_bytes(), whole.size_bytes(), "{quant}");
                assert_eq!(parts.dequantize(), whole.dequantize(), "{quant} by {block}");
                assert_eq!(
                    matmul_tensor(&parts, &x)?.to_vec2::<f32>()?,
                    matmul_tensor(&whole, &x)?.to_vec2::<f32>()?,
                    "{quant} by {block}"
                );
            }
        }
        // Rows of another width or format are refused.
        let mut a = quantize_tensor(&w, Quant::Q4K)?;
        let narrow = quantize_tensor(&w.narrow(1, 0, 256)?, Quant::Q4K)?;
        let err = a.append_rows(narrow, 0).unwrap_err().to_string();
        assert!(err.contains("256") && err.contains("300"), "{err}");
        let err = a
            .append_rows(quantize_tensor(&w, Quant::Q8_0)?, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("q8_0") && err.contains("q4_k"), "{err}");
        Ok(())
    }
}

#[cfg(test)]
mod format_tests;
