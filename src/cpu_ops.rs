//! Element-wise CPU kernels for the two places where a prefill spends its
//! time in `exp`: the softmax over attention scores and SwiGLU's
//! `silu(gate) · up`.
//!
//! candle 0.11 computes both with one scalar libm `expf` per value (and the
//! product as a separate pass over a fresh buffer): at a 512-token prefill
//! of Qwen2.5-0.5B that is ~150 million `expf` calls, about a tenth of the
//! pass. Here `exp` is evaluated sixteen lanes at a time with AVX-512 when
//! the CPU has it (chosen at run time), rows or blocks are spread over
//! rayon's pool, and the SiLU and the product are one pass. Other devices,
//! dtypes and CPUs take candle's path or a portable loop with the same
//! operation order.

use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Values one task takes in the element-wise pass.
const BLOCK: usize = 16 * 1024;

fn use_avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, borrowed in
/// place; `None` when it is not one (the caller then takes candle's path).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let start = layout.start_offset();
    let all = cpu.as_slice::<f32>().ok()?;
    all.get(start..start + t.elem_count()).map(f)
}

/// Softmax over the last dimension (f32 on the CPU here; anything else
/// through candle).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dim = x.dims().last().copied().unwrap_or(0);
    let Some(mut v) = with_f32(x, <[f32]>::to_vec).filter(|_| dim > 0) else {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    };
    let avx512 = use_avx512();
    let rows_per_task = (BLOCK / dim).max(1);
    v.par_chunks_mut(rows_per_task * dim).for_each(|rows| {
        for row in rows.chunks_exact_mut(dim) {
            softmax_row(row, avx512);
        }
    });
    Ok(Tensor::from_vec(v, x.shape(), &Device::Cpu)?)
}

/// `silu(gate) · up` element by element (f32 on the CPU here; anything
/// else through candle). The result is written over a copy of `gate`;
/// `up` is read where it is.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let product = (gate.shape() == up.shape())
        .then(|| with_f32(gate, <[f32]>::to_vec))
        .flatten()
        .and_then(|mut g| {
            let avx512 = use_avx512();
            with_f32(up, |u| {
                g.par_chunks_mut(BLOCK)
                    .zip(u.par_chunks(BLOCK))
                    .for_each(|(g, u)| silu_mul_block(g, u, avx512));
            })?;
            Some(g)
        });
    match product {
        Some(g) => Ok(Tensor::from_vec(g, gate.shape(), &Device::Cpu)?),
        None => Ok((candle_nn::ops::silu(gate)? * up)?),
    }
}

/// `silu(gate) * up` in place in `gate`, the same arithmetic as
/// [`silu_mul`] (so a token's bits do not depend on which path ran).
pub(crate) fn silu_mul_slice(gate: &mut [f32], up: &[f32]) {
    let avx512 = use_avx512();
    gate.par_chunks_mut(BLOCK)
        .zip(up.par_chunks(BLOCK))
        .for_each(|(g, u)| silu_mul_block(g, u, avx512));
}

/// Softmax of one row in place (AVX-512 when the CPU has it).
pub(crate) fn softmax_slice(row: &mut [f32]) {
    softmax_row(row, use_avx512())
}

fn softmax_row(row: &mut [f32], avx512: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: `avx512` is true only when the CPU has AVX-512F.
        return unsafe { x86::softmax_row(row) };
    }
    let _ = avx512;
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

fn silu_mul_block(g: &mut [f32], u: &[f32], avx512: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: `avx512` is true only when the CPU has AVX-512F.
        return unsafe { x86::silu_mul(g, u) };
    }
    let _ = avx512;
    for (g, &u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `eˣ` in sixteen lanes, within about 2 ulp of the exact value: `x` is
    /// split as `n·ln 2 + r` with `|r| ≤ ln 2 / 2` (`ln 2` in two parts, so
    /// `r` is exact), `eʳ` is its degree-7 Taylor polynomial (truncation
    /// below 2⁻²⁸ relative), and `2ⁿ` is applied by `vscalefps`, which also
    /// turns the clamped low end into an exact 0 (`exp(-inf)` = 0, as a
    /// masked score needs) and the high end into +inf.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let x = _mm512_min_ps(x, _mm512_set1_ps(89.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// The mask of the first `n` (< 16) lanes.
    #[inline]
    fn head(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_row(row: &mut [f32]) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let full = n / 16 * 16;
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..full).step_by(16) {
            m = _mm512_max_ps(m, _mm512_loadu_ps(p.add(i)));
        }
        if full < n {
            let v = _mm512_mask_loadu_ps(m, head(n - full), p.add(full));
            m = _mm512_max_ps(m, v);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut sum = _mm512_setzero_ps();
        for i in (0..full).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
            _mm512_storeu_ps(p.add(i), e);
            sum = _mm512_add_ps(sum, e);
        }
        if full < n {
            let k = head(n - full);
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(full)), max));
            _mm512_mask_storeu_ps(p.add(full), k, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in (0..full).step_by(16) {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
        }
        if full < n {
            let k = head(n - full);
            let v = _mm512_maskz_loadu_ps(k, p.add(full));
            _mm512_mask_storeu_ps(p.add(full), k, _mm512_mul_ps(v, inv));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(g: &mut [f32], u: &[f32]) {
        let n = g.len().min(u.len());
        let (gp, up) = (g.as_mut_ptr(), u.as_ptr());
        let one = _mm512_set1_ps(1.0);
        let step = |k: __mmask16, i: usize| {
            let x = _mm512_maskz_loadu_ps(k, gp.add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let s = _mm512_div_ps(x, _mm512_add_ps(one, e));
            let y = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, up.add(i)));
            _mm512_mask_storeu_ps(gp.add(i), k, y);
        };
        let full = n / 16 * 16;
        for i in (0..full).step_by(16) {
            step(!0, i);
        }
        if full < n {
            step(head(n - full), full);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;

    #[test]
    fn softmax_matches_candle_with_masks_and_ragged_rows() -> Result<()> {
        for dim in [1, 7, 16, 33, 512, 1000] {
            let mut v = values(5 * dim, dim as u64, 30.0);
            // Masked scores, as the causal mask adds them.
            for (i, x) in v.iter_mut().enumerate() {
                if i % dim > (i / dim) * 3 + 1 {
                    *x = f32::NEG_INFINITY;
                }
            }
            let x = Tensor::from_vec(v, (5, dim), &Device::Cpu)?;
            let want = candle_nn::ops::softmax_last_dim(&x)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for avx512 in [false, use_avx512()] {
                let mut got = x.flatten_all()?.to_vec1::<f32>()?;
                for row in got.chunks_exact_mut(dim) {
                    softmax_row(row, avx512);
                }
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 2e-6 * w.abs() + 1e-30,
                        "dim {dim}: {g} vs {w}"
                    );
                    // Masked positions are exactly zero.
                    assert_eq!(*w == 0.0, *g == 0.0, "dim {dim}");
                }
            }
            // The tensor function gives the best kernel's rows exactly.
            let mut best = x.flatten_all()?.to_vec1::<f32>()?;
            for row in best.chunks_exact_mut(dim) {
                softmax_row(row, use_avx512());
            }
            assert_eq!(softmax_last_dim(&x)?.flatten_all()?.to_vec1::<f32>()?, best);
        }
        Ok(())
    }

    #[test]
    fn silu_mul_matches_candle_over_the_whole_range() -> Result<()> {
        // Values from -100 to 100: exp's clamps at both ends, and lengths
        // that leave a partial vector.
        for n in [1, 15, 16, 17, 4864, 40_000] {
            let g = values(n, n as u64, 100.0);
            let u = values(n, n as u64 + 1, 2.0);
            let gt = Tensor::from_vec(g.clone(), n, &Device::Cpu)?;
            let ut = Tensor::from_vec(u.clone(), n, &Device::Cpu)?;
            let want = (candle_nn::ops::silu(&gt)? * &ut)?.to_vec1::<f32>()?;
            for avx512 in [false, use_avx512()] {
                let mut got = g.clone();
                silu_mul_block(&mut got, &u, avx512);
                for ((x, y), w) in got.iter().zip(&want).zip(&g) {
                    assert!(
                        (x - y).abs() <= 3e-6 * y.abs() + 1e-37,
                        "silu({w}): {x} vs {y}"
                    );
                }
            }
            let mut best = g.clone();
            silu_mul_block(&mut best, &u, use_avx512());
            assert_eq!(silu_mul(&gt, &ut)?.to_vec1::<f32>()?, best, "n {n}");
        }
        // Shapes that differ go through candle (which names the mismatch).
        let a = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros(5, DType::F32, &Device::Cpu)?;
        assert!(silu_mul(&a, &b).is_err());
        Ok(())
    }
}
