//! The Q8_0 dot-product kernels: a tile of weight rows against up to four
//! quantized activation rows, in integers per block, scaled in f32.
//!
//! Three implementations of one contract ([`Kernel::run`]), picked at run
//! time with `is_x86_feature_detected!` so a generically built binary uses
//! the best the CPU has:
//!
//! - [`Kernel::Avx512Vnni`]: `vpdpbusd` multiplies 64 unsigned weight bytes
//!   (stored as `q + 128`) by 64 signed activation bytes and sums each four
//!   into 16 i32 lanes, eight lanes per block. The offset adds
//!   `128 · Σ q_x` to every block's sum; that term depends only on the
//!   activations, so it is subtracted once per row from a second
//!   accumulator of `d_w · d_x · Σ q_x`, instead of costing an instruction
//!   per block. Each pair of blocks gets its two scales by one permute of
//!   the 16 scales of its group.
//! - [`Kernel::Avx2`]: llama.cpp's sign trick. `vpmaddubsw` also wants
//!   unsigned × signed, so it multiplies `|w|` by `x` carrying the sign of
//!   `w`; the products of two pairs fit i16 because both operands are at
//!   most 127 in magnitude.
//! - [`Kernel::Scalar`]: portable code, the reference for the others.
//!
//! The SIMD functions are `unsafe` `#[target_feature]` functions reading
//! through raw pointers; [`Kernel::run`] is their safe wrapper: it checks the
//! CPU has the features and that every slice holds what the tile's geometry
//! says, which is all the pointer arithmetic relies on.

use std::sync::OnceLock;

use half::f16;

use super::q8_0::{QK8_0, SCALE_GROUP};

/// A kernel implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL and VNNI.
    Avx512Vnni,
}

impl Kernel {
    /// Every kernel, best first.
    pub const ALL: [Kernel; 3] = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Scalar];

    /// The fastest kernel this CPU runs (detected once).
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            Self::ALL
                .into_iter()
                .find(|k| k.is_available())
                .unwrap_or(Kernel::Scalar)
        })
    }

    /// The kernels this CPU runs, best first.
    pub fn available() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// Whether this CPU has the kernel's instructions.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Short name, for benchmarks and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// Dot products of every row of `tile` with each of its `T` activation
    /// rows: `out[r * T + k] = Σ_b d_w[r,b] · d_x[k,b] · Σ_i q_w · q_x`.
    ///
    /// # Panics
    /// If the CPU lacks the kernel's features or the slices do not match the
    /// tile's geometry; both are bugs in the caller, not input errors.
    pub(crate) fn run<const T: usize>(self, tile: &Tile<'_, T>, out: &mut [f32]) {
        tile.check(out.len());
        assert!(self.is_available(), "{self:?} is not available on this CPU");
        match self {
            Kernel::Scalar => scalar(tile, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the features were checked just above, and `check` made
            // sure every read the kernel makes is inside the slices.
            Kernel::Avx2 => unsafe { x86::avx2(tile, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx512Vnni => unsafe { x86::avx512_vnni(tile, out) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("checked by is_available"),
        }
    }
}

/// `rows` weight rows against `T` activation rows of the same geometry.
pub(crate) struct Tile<'a, const T: usize> {
    /// Blocks per row holding data.
    pub blocks: usize,
    /// Bytes of quants per row: `blocks` rounded up to even, × 32.
    pub qstride: usize,
    /// Scales per row: `blocks` rounded up to a multiple of 16.
    pub sstride: usize,
    pub rows: usize,
    /// `rows × qstride` weight bytes, offset binary (`q + 128`).
    pub wq: &'a [u8],
    /// `rows × sstride` weight scales.
    pub ws: &'a [f16],
    /// Per token: `qstride` signed bytes (as u8).
    pub xq: [&'a [u8]; T],
    /// Per token: `sstride` scales.
    pub xd: [&'a [f32]; T],
    /// Per token: `sstride` block sums `Σ q_x`.
    pub xs: [&'a [f32]; T],
}

impl<const T: usize> Tile<'_, T> {
    fn check(&self, out_len: usize) {
        assert_eq!(self.qstride, self.blocks.next_multiple_of(2) * QK8_0);
        assert_eq!(self.sstride, self.blocks.next_multiple_of(SCALE_GROUP));
        assert_eq!(self.wq.len(), self.rows * self.qstride);
        assert_eq!(self.ws.len(), self.rows * self.sstride);
        assert_eq!(out_len, self.rows * T);
        for k in 0..T {
            assert_eq!(self.xq[k].len(), self.qstride);
            assert_eq!(self.xd[k].len(), self.sstride);
            assert_eq!(self.xs[k].len(), self.sstride);
        }
    }
}

fn scalar<const T: usize>(t: &Tile<'_, T>, out: &mut [f32]) {
    for r in 0..t.rows {
        let w = &t.wq[r * t.qstride..(r + 1) * t.qstride];
        let ws = &t.ws[r * t.sstride..(r + 1) * t.sstride];
        let mut acc = [0f32; T];
        for b in 0..t.blocks {
            let wb = &w[b * QK8_0..(b + 1) * QK8_0];
            let dw = ws[b].to_f32();
            for (k, acc) in acc.iter_mut().enumerate() {
                let xb = &t.xq[k][b * QK8_0..(b + 1) * QK8_0];
                let s: i32 = wb
                    .iter()
                    .zip(xb)
                    .map(|(&w, &x)| ((w ^ 0x80) as i8 as i32) * (x as i8 as i32))
                    .sum();
                *acc += dw * t.xd[k][b] * s as f32;
            }
        }
        out[r * T..(r + 1) * T].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
// Index loops over the per-token register arrays read more plainly than
// zipping four of them.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::Tile;
    use crate::quant::unit::{x86::prefetch, PREFETCH_BYTES};

    /// See the module docs. Each iteration of the inner loop takes one
    /// 64-byte line (two blocks) of the weight row and reuses it for all
    /// `T` tokens.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn avx512_vnni<const T: usize>(t: &Tile<'_, T>, out: &mut [f32]) {
        let pairs = t.qstride / 64;
        // Lanes 0..8 take the first block's scale, lanes 8..16 the second's.
        let idx0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let two = _mm512_set1_epi32(2);
        for r in 0..t.rows {
            let w = t.wq.as_ptr().add(r * t.qstride);
            let ws = t.ws.as_ptr().add(r * t.sstride);
            let mut acc = [_mm512_setzero_ps(); T];
            let mut corr = [_mm512_setzero_ps(); T];
            let mut p = 0;
            while p < pairs {
                // The group of 16 blocks starting at block 2p: its scales.
                let g = 2 * p;
                let np = (pairs - p).min(8);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(ws.add(g).cast()));
                // Scales: 2 bytes per 32 weights (see `unit::PREFETCH_BYTES`).
                prefetch(ws, 2 * g + PREFETCH_BYTES / 16);
                let mut c = [_mm512_setzero_ps(); T];
                for k in 0..T {
                    c[k] = _mm512_mul_ps(dw, _mm512_loadu_ps(t.xd[k].as_ptr().add(g)));
                    let s = _mm512_loadu_ps(t.xs[k].as_ptr().add(g));
                    corr[k] = _mm512_fmadd_ps(c[k], s, corr[k]);
                }
                let mut idx = idx0;
                for j in 0..np {
                    let off = (p + j) * 64;
                    prefetch(w, off + PREFETCH_BYTES);
                    let wv = _mm512_loadu_si512(w.add(off).cast());
                    for k in 0..T {
                        let xv = _mm512_loadu_si512(t.xq[k].as_ptr().add(off).cast());
                        let dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                        let scale = _mm512_permutexvar_ps(idx, c[k]);
                        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc[k]);
                    }
                    idx = _mm512_add_epi32(idx, two);
                }
                p += np;
            }
            for k in 0..T {
                *out.get_unchecked_mut(r * T + k) =
                    _mm512_reduce_add_ps(acc[k]) - 128.0 * _mm512_reduce_add_ps(corr[k]);
            }
        }
    }

    /// See the module docs: one 32-byte block per step, `|w| · sign(x, w)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2<const T: usize>(t: &Tile<'_, T>, out: &mut [f32]) {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        for r in 0..t.rows {
            let w = t.wq.as_ptr().add(r * t.qstride);
            let ws = t.ws.as_ptr().add(r * t.sstride);
            let mut acc = [_mm256_setzero_ps(); T];
            let mut g = 0;
            while g < t.blocks {
                let nb = (t.blocks - g).min(16);
                let dw_lo = _mm256_cvtph_ps(_mm_loadu_si128(ws.add(g).cast()));
                prefetch(ws, 2 * g + PREFETCH_BYTES / 16);
                let dw_hi = _mm256_cvtph_ps(_mm_loadu_si128(ws.add(g + 8).cast()));
                let mut c = [[0f32; 16]; T];
                for k in 0..T {
                    let xd = t.xd[k].as_ptr().add(g);
                    _mm256_storeu_ps(c[k].as_mut_ptr(), _mm256_mul_ps(dw_lo, _mm256_loadu_ps(xd)));
                    _mm256_storeu_ps(
                        c[k].as_mut_ptr().add(8),
                        _mm256_mul_ps(dw_hi, _mm256_loadu_ps(xd.add(8))),
                    );
                }
                for i in 0..nb {
                    let off = (g + i) * 32;
                    if i % 2 == 0 {
                        prefetch(w, off + PREFETCH_BYTES);
                    }
                    let wv = _mm256_xor_si256(_mm256_loadu_si256(w.add(off).cast()), flip);
                    let aw = _mm256_abs_epi8(wv);
                    for k in 0..T {
                        let xv = _mm256_loadu_si256(t.xq[k].as_ptr().add(off).cast());
                        let sx = _mm256_sign_epi8(xv, wv);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                        acc[k] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(c[k][i]), acc[k]);
                    }
                }
                g += 16;
            }
            for k in 0..T {
                *out.get_unchecked_mut(r * T + k) = hsum256(acc[k]);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}
