//! The Q4_K format (`--quant q4_k`): llama.cpp's `block_q4_k`. Super-blocks
//! of [`QK_K`] = 256 weights in eight sub-blocks of 32; each sub-block has a
//! 6-bit scale `sc` and a 6-bit minimum `m`, the super-block an f16 `d` and
//! `dmin`, and weight `i` of sub-block `j` is `d·sc_j·q_i − dmin·m_j` for a
//! 4-bit `q_i`. 4.5 bits a weight in ggml's 144-byte block.
//!
//! # Quantizing
//!
//! Our own code after the method of llama.cpp's `quantize_row_q4_K_ref`:
//! each sub-block gets the affine grid `x ≈ s·L − m` (`L` in 0..=15, `m ≥ 0`)
//! that minimises the error weighted by `rms(x) + |x|` (large weights
//! matter more), found by trying 21 grid spacings around `range / 15` and
//! solving the 2×2 least-squares problem for `s` and `m` at each; then the
//! eight scales and minimums are themselves quantized to 6 bits against the
//! largest of each, and the weights re-quantized to the final grid.
//!
//! # Layout
//!
//! The unit layout of `unit.rs` (64 bytes of nibbles per 128 weights, lines
//! 64-byte aligned) and, per super-block, 20 bytes: the scales and minimums
//! unpacked to one byte each (ggml packs them into 12 bytes of 6-bit fields,
//! which would cost the kernels a dozen shifts and masks per super-block to
//! save 4 bytes of 148), and `d`, `dmin`. A row whose length is an odd
//! number of units (896 = 3.5 super-blocks) ends with half a super-block:
//! the unit layout needs no padding beyond 128.

use half::f16;
use rayon::prelude::*;

use super::check_ggml;
use super::kernels::Kernel;
use super::q8_0::{line_bytes, line_bytes_mut, lines, Line};
use super::unit::{self, pack_nibbles, unpack_nibbles, ActScale, ScalarUnit, UnitFormat, UNIT};
use crate::{Error, Result};

/// Weights per super-block (llama.cpp's `QK_K`).
pub const QK_K: usize = 256;
/// Bytes of one ggml `block_q4_K`: f16 `d`, f16 `dmin`, 12 bytes of 6-bit
/// scales and minimums, 128 bytes of nibbles.
pub const Q4_K_BLOCK_BYTES: usize = 144;

/// One super-block's scales: `sm` is the eight sub-block scales, then the
/// eight minimums; `dm` is `[d, dmin]`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Meta {
    sm: [u8; 16],
    dm: [f16; 2],
}

/// A weight matrix `[rows, cols]` in Q4_K.
#[derive(Clone)]
pub struct Q4KMatrix {
    rows: usize,
    cols: usize,
    units: usize,
    /// Super-blocks per row (the last may hold one unit).
    sbs: usize,
    /// `rows × units` lines of nibbles.
    qs: Vec<Line>,
    /// `rows × sbs` scales.
    meta: Vec<Meta>,
}

impl std::fmt::Debug for Q4KMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q4KMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// One super-block, decoded: scales, minimums and the 4-bit integers in
/// order.
struct Block {
    d: f16,
    dmin: f16,
    sc: [u8; 8],
    m: [u8; 8],
    q: [u8; QK_K],
}

/// The affine grid for one sub-block: `(s, m)` with `x ≈ s·L − m`, `L` in
/// 0..=15, minimising `Σ w (s·L − m − x)²` over the spacings tried.
fn fit_sub_block(x: &[f32; 32], w: &[f32; 32]) -> (f32, f32) {
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    // The grid starts at or below zero so that zero stays representable
    // (m ≥ 0).
    let mut origin = x.iter().fold(f32::INFINITY, |a, &b| a.min(b)).min(0.0);
    if hi <= origin {
        return (0.0, -origin);
    }
    let sum_w: f32 = w.iter().sum();
    let sum_x: f32 = w.iter().zip(x).map(|(w, x)| w * x).sum();
    let grid = |iscale: f32, origin: f32| -> [f32; 32] {
        std::array::from_fn(|i| {
            ((x[i] - origin) * iscale)
                .round_ties_even()
                .clamp(0.0, 15.0)
        })
    };
    let error = |s: f32, o: f32, l: &[f32; 32]| -> f32 {
        (0..32)
            .map(|i| {
                let e = s * l[i] + o - x[i];
                w[i] * e * e
            })
            .sum()
    };
    let mut scale = (hi - origin) / 15.0;
    let mut best = error(scale, origin, &grid(1.0 / scale, origin));
    for step in 0..=20 {
        // Spacings from range/14 to range/16: a slightly coarser or finer
        // grid often fits the bulk of the values better than the one that
        // exactly spans the extremes.
        let iscale = (14.0 + 0.1 * step as f32) / (hi - origin);
        let l = grid(iscale, origin);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for i in 0..32 {
            sl += w[i] * l[i];
            sl2 += w[i] * l[i] * l[i];
            sxl += w[i] * l[i] * x[i];
        }
        // Weighted least squares for x ≈ s·L + o over this assignment.
        let det = sum_w * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut s = (sum_w * sxl - sum_x * sl) / det;
        let mut o = (sl2 * sum_x - sl * sxl) / det;
        if o > 0.0 {
            // The format's minimum only lowers: refit the scale alone.
            o = 0.0;
            s = sxl / sl2;
        }
        let e = error(s, o, &l);
        if e < best {
            best = e;
            scale = s;
            origin = o;
        }
    }
    (scale, -origin)
}

fn quantize_block(x: &[f32; QK_K]) -> Block {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for j in 0..8 {
        let xs: &[f32; 32] = x[32 * j..32 * (j + 1)].try_into().expect("32 values");
        let rms = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: [f32; 32] = std::array::from_fn(|i| rms + xs[i].abs());
        (scales[j], mins[j]) = fit_sub_block(xs, &w);
    }
    let max_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
    let max_min = mins.iter().fold(0f32, |a, &b| a.max(b));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let six_bits = |v: f32| v.round_ties_even().clamp(0.0, 63.0) as u8;
    let sc: [u8; 8] = std::array::from_fn(|j| six_bits(inv_scale * scales[j]));
    let m: [u8; 8] = std::array::from_fn(|j| six_bits(inv_min * mins[j]));
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let mut q = [0u8; QK_K];
    // The integers against the grid as stored (6-bit scales, f16 factors).
    for j in 0..8 {
        let step = d.to_f32() * sc[j] as f32;
        if step == 0.0 {
            continue;
        }
        let shift = dmin.to_f32() * m[j] as f32;
        for i in 32 * j..32 * (j + 1) {
            q[i] = ((x[i] + shift) / step).round_ties_even().clamp(0.0, 15.0) as u8;
        }
    }
    Block { d, dmin, sc, m, q }
}

/// ggml's block: the 6-bit fields are unpacked as llama.cpp's
/// `get_scale_min_k4` reads them; the nibbles of each 32 bytes hold two
/// sub-blocks (low nibbles the first).
fn parse_ggml(b: &[u8]) -> Block {
    let s = &b[4..16];
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    let qs = &b[16..144];
    let mut q = [0u8; QK_K];
    for c in 0..4 {
        for l in 0..32 {
            q[64 * c + l] = qs[32 * c + l] & 0x0F;
            q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
    }
    Block {
        d: f16::from_le_bytes([b[0], b[1]]),
        dmin: f16::from_le_bytes([b[2], b[3]]),
        sc,
        m,
        q,
    }
}

fn write_ggml(block: &Block, out: &mut [u8]) {
    out[0..2].copy_from_slice(&block.d.to_le_bytes());
    out[2..4].copy_from_slice(&block.dmin.to_le_bytes());
    let (sc, m) = (&block.sc, &block.m);
    for j in 0..4 {
        out[4 + j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        out[8 + j] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        out[12 + j] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    for c in 0..4 {
        for l in 0..32 {
            out[16 + 32 * c + l] = block.q[64 * c + l] | (block.q[64 * c + 32 + l] << 4);
        }
    }
}

impl Q4KMatrix {
    fn zeroed(rows: usize, cols: usize) -> Self {
        let units = unit::units_for(cols);
        let sbs = units.div_ceil(2);
        Q4KMatrix {
            rows,
            cols,
            units,
            sbs,
            qs: lines(rows * units * 64),
            meta: vec![Meta::default(); rows * sbs],
        }
    }

    /// Fills every row from its super-blocks, rows in parallel:
    /// `block(r, s)` gives super-block `s` of row `r`.
    fn fill(&mut self, block: impl Fn(usize, usize) -> Block + Sync) {
        let (units, sbs) = (self.units, self.sbs);
        let qs = &mut line_bytes_mut(&mut self.qs)[..self.rows * units * 64];
        qs.par_chunks_mut(units * 64)
            .zip(self.meta.par_chunks_mut(sbs))
            .enumerate()
            .with_min_len(4)
            .for_each(|(r, (qs, meta))| {
                for (s, meta) in meta.iter_mut().enumerate() {
                    let b = block(r, s);
                    meta.sm[..8].copy_from_slice(&b.sc);
                    meta.sm[8..].copy_from_slice(&b.m);
                    meta.dm = [b.d, b.dmin];
                    for h in 0..2 {
                        let u = 2 * s + h;
                        if u < units {
                            let q: &[u8; UNIT] =
                                b.q[h * UNIT..(h + 1) * UNIT].try_into().expect("a unit");
                            let out: &mut [u8; 64] = (&mut qs[u * 64..(u + 1) * 64])
                                .try_into()
                                .expect("64-byte unit");
                            pack_nibbles(q, out);
                        }
                    }
                }
            });
    }

    /// Quantizes a row-major `[rows, cols]` matrix, rows in parallel. Any
    /// `cols` works: the row is padded with zeros to a whole unit (128).
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 || data.len() != rows * cols {
            return Err(Error::InvalidRequest(format!(
                "cannot quantize {} values as a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        let mut m = Self::zeroed(rows, cols);
        m.fill(|r, s| {
            let row = &data[r * cols..(r + 1) * cols];
            let x = &row[(s * QK_K).min(cols)..((s + 1) * QK_K).min(cols)];
            let mut padded = [0f32; QK_K];
            padded[..x.len()].copy_from_slice(x);
            quantize_block(&padded)
        });
        Ok(m)
    }

    /// Adopts ggml's `block_q4_K` bytes of a `[rows, cols]` tensor (`cols`
    /// is ggml's `ne[0]`, a multiple of 256).
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let blocks = check_ggml("Q4_K", bytes.len(), rows, cols, QK_K, Q4_K_BLOCK_BYTES)?;
        let mut m = Self::zeroed(rows, cols);
        m.fill(|r, s| {
            let at = (r * blocks + s) * Q4_K_BLOCK_BYTES;
            parse_ggml(&bytes[at..at + Q4_K_BLOCK_BYTES])
        });
        Ok(m)
    }

    /// The matrix as ggml's `block_q4_K` bytes; `cols` must be a multiple
    /// of 256.
    pub fn to_ggml_bytes(&self) -> Result<Vec<u8>> {
        if !self.cols.is_multiple_of(QK_K) {
            return Err(Error::Quant(format!(
                "a Q4_K row of {} weights is not whole ggml super-blocks of {QK_K}",
                self.cols
            )));
        }
        let mut out = vec![0u8; self.rows * self.sbs * Q4_K_BLOCK_BYTES];
        for r in 0..self.rows {
            for s in 0..self.sbs {
                let meta = &self.meta[r * self.sbs + s];
                let mut q = [0u8; QK_K];
                for h in 0..2 {
                    q[h * UNIT..(h + 1) * UNIT]
                        .copy_from_slice(&unpack_nibbles(&self.qs[r * self.units + 2 * s + h].0));
                }
                let block = Block {
                    d: meta.dm[0],
                    dmin: meta.dm[1],
                    sc: meta.sm[..8].try_into().expect("8 scales"),
                    m: meta.sm[8..].try_into().expect("8 minimums"),
                    q,
                };
                let at = (r * self.sbs + s) * Q4_K_BLOCK_BYTES;
                write_ggml(&block, &mut out[at..at + Q4_K_BLOCK_BYTES]);
            }
        }
        Ok(out)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held: nibbles and scales, padding included.
    pub fn size_bytes(&self) -> usize {
        self.qs.len() * 64 + self.meta.len() * std::mem::size_of::<Meta>()
    }

    /// Back to dense f32 `[rows, cols]`, as llama.cpp's
    /// `dequantize_row_q4_K` computes it.
    pub fn dequantize(&self) -> Vec<f32> {
        unit::dequantize(self)
    }

    /// `x · Wᵀ` for `x` row-major `[tokens, cols]`: `[tokens, rows]`, with
    /// the best kernel this CPU has.
    pub fn matmul(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        self.matmul_with(Kernel::best(), x, tokens)
    }

    /// [`Self::matmul`] with a chosen kernel (for tests and benchmarks).
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        unit::matmul(kernel, self, x, tokens)
    }
}

/// Per half super-block `h`: lane `l` takes sub-block `4h + l / 4`'s scale
/// (index into `sm`); its minimum is 8 further on.
const SCALE_OF_LANE: [[i32; 16]; 2] = [
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
    [4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7],
];
const MIN_OF_LANE: [[i32; 16]; 2] = [
    [8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11],
    [
        12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15,
    ],
];
/// `[d, dmin]` spread to the scales' and the minimums' halves of `sm`.
#[cfg(target_arch = "x86_64")]
const D_DMIN: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];

impl UnitFormat for Q4KMatrix {
    const ACTS: ActScale = ActScale::Super256;

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn units(&self) -> usize {
        self.units
    }

    fn row_bytes(&self) -> usize {
        self.units * 64 + self.sbs * std::mem::size_of::<Meta>()
    }

    fn unit_scalar(&self, r: usize, u: usize, out: &mut ScalarUnit) {
        let (lo, hi) = out.q.split_at_mut(64);
        for ((lo, hi), &b) in lo.iter_mut().zip(hi).zip(&self.qs[r * self.units + u].0) {
            *lo = b & 0x0F;
            *hi = b >> 4;
        }
        let meta = &self.meta[r * self.sbs + u / 2];
        let (d, dmin) = (meta.dm[0].to_f32(), meta.dm[1].to_f32());
        let h = u % 2;
        for l in 0..16 {
            out.dl[l] = d * meta.sm[SCALE_OF_LANE[h][l] as usize] as f32;
            out.ol[l] = dmin * meta.sm[MIN_OF_LANE[h][l] as usize] as f32;
        }
    }

    fn weight(dl: f32, ol: f32, q: u8) -> f32 {
        dl * q as f32 - ol
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unit_avx512(&self, r: usize, u: usize) -> unit::x86::Unit512 {
        use std::arch::x86_64::*;
        let (q0, q1) =
            unit::x86::nibbles512(line_bytes(&self.qs).as_ptr().add((r * self.units + u) * 64));
        let meta = self.meta.as_ptr().add(r * self.sbs + u / 2);
        let sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
            (*meta).sm.as_ptr().cast(),
        )));
        let dm = unit::x86::f16x2((*meta).dm.as_ptr().cast());
        // [d·sc_0 … d·sc_7, dmin·m_0 … dmin·m_7]
        let f = _mm512_mul_ps(sm, unit::x86::lanes512(_mm512_castps128_ps512(dm), &D_DMIN));
        let h = u % 2;
        unit::x86::Unit512 {
            q0,
            q1,
            dl: unit::x86::lanes512(f, &SCALE_OF_LANE[h]),
            ol: unit::x86::lanes512(f, &MIN_OF_LANE[h]),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unit_avx2(&self, r: usize, u: usize) -> unit::x86::Unit256 {
        use std::arch::x86_64::*;
        let q = unit::x86::nibbles256(line_bytes(&self.qs).as_ptr().add((r * self.units + u) * 64));
        let meta = self.meta.as_ptr().add(r * self.sbs + u / 2);
        let sm = (*meta).sm.as_ptr();
        let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(sm.cast())));
        let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(sm.add(8).cast())));
        let dm = _mm256_castps128_ps256(unit::x86::f16x2((*meta).dm.as_ptr().cast()));
        let fs = _mm256_mul_ps(sc, unit::x86::lanes256(dm, &[0; 8]));
        let fm = _mm256_mul_ps(m, unit::x86::lanes256(dm, &[1; 8]));
        // Lanes 0–7 take sub-blocks 4h and 4h + 1, lanes 8–15 the next two.
        let h = 4 * (u % 2) as i32;
        let lo = [h, h, h, h, h + 1, h + 1, h + 1, h + 1];
        let hi = [h + 2, h + 2, h + 2, h + 2, h + 3, h + 3, h + 3, h + 3];
        unit::x86::Unit256 {
            q,
            dl: [unit::x86::lanes256(fs, &lo), unit::x86::lanes256(fs, &hi)],
            ol: [unit::x86::lanes256(fm, &lo), unit::x86::lanes256(fm, &hi)],
        }
    }
}
