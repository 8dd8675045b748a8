//! Weight quantization for CPU inference: `--quant q8_0`.
//!
//! Owns the Q8_0 format ([`Q8Matrix`]: blocks of 32 int8 weights sharing one
//! f16 scale `d = max|x| / 127`, the format of llama.cpp's `Q8_0`), the
//! quantization of activations on the fly ([`Q8Activations`]: blocks of 32
//! int8 values with an f32 scale), and the integer matrix products between
//! them ([`kernels`]), chosen at run time for the CPU at hand (AVX-512 VNNI,
//! AVX2, or portable scalar code) and spread over rayon's global pool.
//!
//! Talks to nobody but candle's CPU tensors: `models::layers::Linear` holds a
//! [`Q8Matrix`] instead of a dense weight when the model is loaded with
//! [`Quant::Q8_0`], quantizing each tensor right after it is read so the
//! dense copy of every weight never exists at once.

pub mod kernels;
mod q8_0;

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Storage, Tensor};

pub use kernels::Kernel;
pub use q8_0::{matmul_many, Q8Activations, Q8Matrix, QK8_0};

use crate::{Error, Result};

/// How the linear projections' weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quant {
    /// Dense, in the model's dtype.
    #[default]
    None,
    /// 8-bit blocks of 32 with an f16 scale; CPU only.
    Q8_0,
}

impl FromStr for Quant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "no" | "off" => Ok(Self::None),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            other => Err(Error::Device(format!(
                "--quant '{other}' is not one of none, q8_0"
            ))),
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Q8_0 => "q8_0",
        })
    }
}

/// What a quantized product on another device says.
const CPU_ONLY: &str =
    "quantized weights (--quant q8_0) run on the CPU only for now: use --device cpu, or --quant none on a GPU";

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

/// A quantized `[out, in]` weight in one of the supported formats.
///
/// Every format offers the same four things: its shape, its size in memory,
/// `x · Wᵀ` on f32 rows, and a dense copy for tests.
#[derive(Debug)]
pub enum QMatrix {
    Q8_0(Q8Matrix),
}

impl QMatrix {
    pub fn rows(&self) -> usize {
        match self {
            QMatrix::Q8_0(q) => q.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            QMatrix::Q8_0(q) => q.cols(),
        }
    }

    /// Bytes of quantized blocks and scales.
    pub fn size_bytes(&self) -> usize {
        match self {
            QMatrix::Q8_0(q) => q.size_bytes(),
        }
    }

    /// The format's name, as `--quant` spells it.
    pub fn format(&self) -> Quant {
        match self {
            QMatrix::Q8_0(_) => Quant::Q8_0,
        }
    }

    /// `x · Wᵀ` for `tokens` rows of `cols()` values: `tokens × rows()` f32.
    pub fn matmul(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        match self {
            QMatrix::Q8_0(q) => q.matmul(x, tokens),
        }
    }

    /// The weights as stored (dequantized), row-major `rows × cols`.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QMatrix::Q8_0(q) => q.dequantize(),
        }
    }
}

/// Quantizes a dense `[out, in]` weight (any float dtype, on the CPU) into
/// `quant`'s format.
pub fn quantize_tensor(w: &Tensor, quant: Quant) -> Result<QMatrix> {
    let (rows, cols) = w.dims2()?;
    match quant {
        Quant::Q8_0 => Ok(QMatrix::Q8_0(with_f32_slice(w, |data| {
            Q8Matrix::quantize(data, rows, cols)
        })??)),
        Quant::None => Err(Error::InvalidRequest(
            "quantize_tensor needs a quantized format, not 'none'".into(),
        )),
    }
}

/// `x · Wᵀ` for `x` of shape `[..., in]` on the CPU: `[..., out]` in `x`'s
/// dtype, computed through the Q8_0 kernels.
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
/// `x`, in one parallel pass (see [`matmul_many`]).
pub fn matmul_tensor_many(ws: &[&Q8Matrix], x: &Tensor) -> Result<Vec<Tensor>> {
    if !x.device().is_cpu() {
        return Err(Error::Device(CPU_ONLY.into()));
    }
    let dims = x.dims();
    let cols = dims.last().copied().unwrap_or(0);
    if let Some(w) = ws.iter().find(|w| w.cols() != cols) {
        return Err(Error::InvalidRequest(format!(
            "a Q8_0 projection of width {} got input of shape {dims:?}",
            w.cols()
        )));
    }
    let tokens = x.elem_count() / cols.max(1);
    let ys = with_f32_slice(x, |data| matmul_many(Kernel::best(), ws, data, tokens))??;
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

    #[test]
    fn parses_quant_names() -> Result<()> {
        assert_eq!("none".parse::<Quant>()?, Quant::None);
        assert_eq!("Q8_0".parse::<Quant>()?, Quant::Q8_0);
        let err = "q4_k".parse::<Quant>().unwrap_err().to_string();
        assert!(err.contains("q4_k") && err.contains("q8_0"), "{err}");
        assert_eq!(Quant::Q8_0.to_string(), "q8_0");
        Ok(())
    }

    #[test]
    fn tensor_product_matches_candle_within_quantization_error() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (48, 96), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 96), &dev)?;
        let q = quantize_tensor(&w, Quant::Q8_0)?;
        let y = matmul_tensor(&q, &x)?;
        assert_eq!(y.dims(), &[3, 48]);
        let want = x.matmul(&w.t()?)?;
        let err = (y - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            err < 0.02 * scale,
            "error {err} against outputs up to {scale}"
        );
        // A non-contiguous input goes through a copy and gives the same rows.
        let xt = x.t()?.contiguous()?.t()?;
        let y2 = matmul_tensor(&q, &xt)?;
        assert_eq!(
            matmul_tensor(&q, &x)?.to_vec2::<f32>()?,
            y2.to_vec2::<f32>()?
        );
        // Several matrices in one pass give what each gives alone.
        let q2 = quantize_tensor(&Tensor::randn(0f32, 0.05, (17, 96), &dev)?, Quant::Q8_0)?;
        let (QMatrix::Q8_0(q8), QMatrix::Q8_0(q28)) = (&q, &q2);
        let both = matmul_tensor_many(&[q8, q28], &x)?;
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
        assert!(err.contains("96") && err.contains("95"), "{err}");
        Ok(())
    }
}
