//! The Q6_K format: llama.cpp's `block_q6_K`. Super-blocks of 256 weights
//! in sixteen groups of 16; each group has a signed 8-bit scale `sc`, the
//! super-block an f16 `d`, and a weight is `d·sc·(q − 32)` for a 6-bit `q`.
//! 6.5625 bits a weight in ggml's 210-byte block. `--quant q4_k` stores the
//! output head in it, as llama.cpp's Q4_K_M does: the head is the one
//! product whose errors go straight into the logits.
//!
//! # Quantizing
//!
//! Our own code after the method of llama.cpp's `quantize_row_q6_K_ref`:
//! each group's scale is chosen among 19 grid spacings around
//! `max / 32` (the value of largest magnitude landing on −32, the end of
//! the asymmetric range that has one more level) by the least-squares scale
//! for each rounding, weighted by `x²`; the sixteen scales are then
//! quantized to signed bytes against the largest, and the weights
//! re-quantized to the final grid.
//!
//! # Layout
//!
//! The unit layout of `unit.rs` for the low four bits (64 bytes per 128
//! weights), 32 bytes per unit for the high two bits, and per super-block
//! the sixteen scales and `d`: the same 210 bytes per 256 weights as ggml.
//! In a unit's 32 bytes of high bits, the two bits of unit-order position
//! `64·v + p` sit in byte `p % 32` at bit `4·v + 2·(p / 32)`, so that one
//! 32-byte load, broadcast to both halves of a 512-bit register with the
//! upper half shifted right by two, lines every weight's high bits up under
//! its nibble after one shift and mask per vector.

use half::f16;
use rayon::prelude::*;

use super::check_ggml;
use super::q4_k::QK_K;
#[cfg(target_arch = "x86_64")]
use super::q8_0::line_bytes;
use super::q8_0::{line_bytes_mut, lines, Line};
use super::unit::{self, round_clamped, ActScale, ScalarUnit, UnitFormat, POS, UNIT};
use crate::{Error, Result};

/// Bytes of one ggml `block_q6_K`: 128 bytes of low nibbles, 64 of high
/// bits, 16 signed scales, f16 `d`.
pub const Q6_K_BLOCK_BYTES: usize = 210;

/// One super-block's scales.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Meta {
    sc: [i8; 16],
    d: f16,
}

/// A weight matrix `[rows, cols]` in Q6_K.
#[derive(Clone)]
pub struct Q6KMatrix {
    rows: usize,
    cols: usize,
    units: usize,
    sbs: usize,
    /// `rows × units` lines of low nibbles.
    ql: Vec<Line>,
    /// `rows × units` × 32 bytes of high bits.
    qh: Vec<[u8; 32]>,
    /// `rows × sbs` scales.
    meta: Vec<Meta>,
}

impl std::fmt::Debug for Q6KMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q6KMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// One super-block, decoded: its scales and the 6-bit integers in order.
struct Block {
    d: f16,
    sc: [i8; 16],
    q: [u8; QK_K],
}

/// Sixteen values, one per group of a super-block: the fit below runs the
/// sixteen groups side by side, one per SIMD lane (see `q4_k.rs`).
type Lanes = [f32; 16];

/// The scale `s_g` for each group `g` (column `g` of `xt`: `xt[i][g]` is
/// value `i` of group `g`) with `x ≈ s·L`, `L` in −32..=31, minimising
/// `Σ x² (s·L − x)²` over the grid spacings tried; and the integers
/// `L + 32` of the spacing chosen (transposed like `xt`), which a group
/// keeps if its scale later rounds to zero, as in llama.cpp (they stand for
/// zero either way, but the same bytes make the formats comparable).
#[inline(always)]
fn fit_groups(xt: &[Lanes; 16]) -> (Lanes, [Lanes; 16]) {
    // Each group's value of largest magnitude, with its sign. A group
    // whose values are all (nearly) zero keeps scale 0 and integers 0.
    let mut max = [0f32; 16];
    for x in xt {
        for g in 0..16 {
            if x[g].abs() > max[g].abs() {
                max[g] = x[g];
            }
        }
    }
    let zero: [bool; 16] = std::array::from_fn(|g| max[g].abs() < 1e-15);
    let mut scale = [0f32; 16];
    let mut best_l = [[0f32; 16]; 16];
    let mut l = [[0f32; 16]; 16];
    // For a fixed rounding L, the best scale is Σwxl / Σwl² and it lowers
    // the error by (Σwxl)² / Σwl²: keep the rounding that lowers it most.
    let mut gain = [0f32; 16];
    // The spacing that puts the largest value on −32 first (the end of the
    // range with one more level), then the others: ties keep the first.
    for step in [
        0, -9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9,
    ] {
        let iscale: Lanes = std::array::from_fn(|g| {
            if zero[g] {
                0.0
            } else {
                -(32.0 + 0.1 * step as f32) / max[g]
            }
        });
        let (mut sxl, mut sl2) = ([0f32; 16], [0f32; 16]);
        for (x, l) in xt.iter().zip(&mut l) {
            for g in 0..16 {
                l[g] = round_clamped(iscale[g] * x[g], -32.0, 31.0);
                let w = x[g] * x[g];
                sxl[g] += w * x[g] * l[g];
                sl2[g] += w * l[g] * l[g];
            }
        }
        let better: [bool; 16] = std::array::from_fn(|g| {
            // The first spacing is taken as it is (its scale 0 if Σwl² is).
            !zero[g] && (step == 0 || (sl2[g] > 0.0 && sxl[g] * sxl[g] > gain[g] * sl2[g]))
        });
        for g in 0..16 {
            if better[g] {
                scale[g] = if sl2[g] > 0.0 { sxl[g] / sl2[g] } else { 0.0 };
                gain[g] = scale[g] * sxl[g];
            }
        }
        for (best, l) in best_l.iter_mut().zip(&l) {
            for g in 0..16 {
                if better[g] {
                    best[g] = l[g] + 32.0;
                }
            }
        }
    }
    (scale, best_l)
}

unit::simd_dispatch!(quantize_block_simd(x: &[f32; QK_K]) -> Block = quantize_block);

#[inline(always)]
fn quantize_block(x: &[f32; QK_K]) -> Block {
    let xt: [Lanes; 16] = std::array::from_fn(|i| std::array::from_fn(|g| x[16 * g + i]));
    let (scales, fitted) = fit_groups(&xt);
    let mut max = 0f32;
    for &s in &scales {
        if s.abs() > max.abs() {
            max = s;
        }
    }
    if max.abs() < 1e-15 {
        // All zero, as llama.cpp writes it: every byte 0.
        return Block {
            d: f16::ZERO,
            sc: [0; 16],
            q: [0; QK_K],
        };
    }
    // The largest scale maps to −128, as the integers' largest maps to −32.
    let iscale = -128.0 / max;
    let d = f16::from_f32(1.0 / iscale);
    let sc: [i8; 16] =
        std::array::from_fn(|g| round_clamped(iscale * scales[g], -128.0, 127.0) as i8);
    let mut q = [0u8; QK_K];
    for (g, (q, x)) in q.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
        let step = d.to_f32() * sc[g] as f32;
        for (i, (q, &x)) in q.iter_mut().zip(x).enumerate() {
            *q = if step == 0.0 {
                fitted[i][g] as u8
            } else {
                (round_clamped(x / step, -32.0, 31.0) as i32 + 32) as u8
            };
        }
    }
    Block { d, sc, q }
}

/// ggml's block: each 128 weights take 64 bytes of `ql` (weights `l` and
/// `l + 64` in the low and high nibbles of byte `l`, `l + 32` and `l + 96`
/// in byte `l + 32`) and 32 bytes of `qh` (the four weights' high bits in
/// byte `l`, two bits each).
fn parse_ggml(b: &[u8]) -> Block {
    let (ql, qh) = (&b[..128], &b[128..192]);
    let mut q = [0u8; QK_K];
    for n in 0..2 {
        let (ql, qh, q) = (&ql[64 * n..], &qh[32 * n..], &mut q[128 * n..]);
        for l in 0..32 {
            q[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    Block {
        d: f16::from_le_bytes([b[208], b[209]]),
        sc: std::array::from_fn(|g| b[192 + g] as i8),
        q,
    }
}

fn write_ggml(block: &Block, out: &mut [u8]) {
    for n in 0..2 {
        let q = &block.q[128 * n..];
        for l in 0..32 {
            out[64 * n + l] = (q[l] & 0x0F) | ((q[l + 64] & 0x0F) << 4);
            out[64 * n + l + 32] = (q[l + 32] & 0x0F) | ((q[l + 96] & 0x0F) << 4);
            out[128 + 32 * n + l] = (q[l] >> 4)
                | ((q[l + 32] >> 4) << 2)
                | ((q[l + 64] >> 4) << 4)
                | ((q[l + 96] >> 4) << 6);
        }
    }
    for g in 0..16 {
        out[192 + g] = block.sc[g] as u8;
    }
    out[208..210].copy_from_slice(&block.d.to_le_bytes());
}

/// A unit's 6-bit integers (natural order) as its 64 bytes of nibbles and
/// 32 bytes of high bits.
fn pack_unit(q: &[u8; UNIT], ql: &mut [u8; 64], qh: &mut [u8; 32]) {
    unit::pack_nibbles(q, ql);
    qh.fill(0);
    for (j, &v) in q.iter().enumerate() {
        let pos = POS[j] as usize;
        let (v_, p) = (pos / 64, pos % 64);
        qh[p % 32] |= ((v >> 4) & 3) << (4 * v_ + 2 * (p / 32));
    }
}

/// The inverse of [`pack_unit`], in unit order (position `64·v + p`).
fn unit_order(ql: &[u8; 64], qh: &[u8; 32], out: &mut [u8; UNIT]) {
    for v in 0..2 {
        for p in 0..64 {
            let lo = if v == 0 { ql[p] & 0x0F } else { ql[p] >> 4 };
            let hi = (qh[p % 32] >> (4 * v + 2 * (p / 32))) & 3;
            out[64 * v + p] = lo | (hi << 4);
        }
    }
}

impl Q6KMatrix {
    fn zeroed(rows: usize, cols: usize) -> Self {
        let units = unit::units_for(cols);
        let sbs = units.div_ceil(2);
        Q6KMatrix {
            rows,
            cols,
            units,
            sbs,
            ql: lines(rows * units * 64),
            qh: vec![[0; 32]; rows * units],
            meta: vec![Meta::default(); rows * sbs],
        }
    }

    /// Fills every row from its super-blocks, rows in parallel.
    fn fill(&mut self, block: impl Fn(usize, usize) -> Block + Sync) {
        let (units, sbs) = (self.units, self.sbs);
        let ql = &mut line_bytes_mut(&mut self.ql)[..self.rows * units * 64];
        ql.par_chunks_mut(units * 64)
            .zip(self.qh.par_chunks_mut(units))
            .zip(self.meta.par_chunks_mut(sbs))
            .enumerate()
            .with_min_len(4)
            .for_each(|(r, ((ql, qh), meta))| {
                for (s, meta) in meta.iter_mut().enumerate() {
                    let b = block(r, s);
                    *meta = Meta { sc: b.sc, d: b.d };
                    for h in 0..2 {
                        let u = 2 * s + h;
                        if u < units {
                            let q = unit::unit_of_super(&b.q, units, s, h);
                            // A range of exactly 64 bytes: cannot fail.
                            let out: &mut [u8; 64] = (&mut ql[u * 64..(u + 1) * 64])
                                .try_into()
                                .expect("64-byte unit");
                            pack_unit(&q, out, &mut qh[u]);
                        }
                    }
                }
            });
    }

    /// Quantizes a row-major `[rows, cols]` matrix, rows in parallel. Any
    /// `cols` works: the row is padded with zeros to a whole unit (128).
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        super::check_dense(data.len(), rows, cols)?;
        let mut m = Self::zeroed(rows, cols);
        m.fill(|r, s| {
            let row = &data[r * cols..(r + 1) * cols];
            let x = &row[(s * QK_K).min(cols)..((s + 1) * QK_K).min(cols)];
            let mut padded = [0f32; QK_K];
            padded[..x.len()].copy_from_slice(x);
            quantize_block_simd(&padded)
        });
        Ok(m)
    }

    /// Adopts ggml's `block_q6_K` bytes of a `[rows, cols]` tensor (`cols`
    /// is ggml's `ne[0]`, a multiple of 256).
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let blocks = check_ggml("Q6_K", bytes.len(), rows, cols, QK_K, Q6_K_BLOCK_BYTES)?;
        let mut m = Self::zeroed(rows, cols);
        m.fill(|r, s| {
            let at = (r * blocks + s) * Q6_K_BLOCK_BYTES;
            parse_ggml(&bytes[at..at + Q6_K_BLOCK_BYTES])
        });
        Ok(m)
    }

    /// The matrix as ggml's `block_q6_K` bytes; `cols` must be a multiple
    /// of 256.
    pub fn to_ggml_bytes(&self) -> Result<Vec<u8>> {
        if !self.cols.is_multiple_of(QK_K) {
            return Err(Error::Quant(format!(
                "a Q6_K row of {} weights is not whole ggml super-blocks of {QK_K}",
                self.cols
            )));
        }
        let mut out = vec![0u8; self.rows * self.sbs * Q6_K_BLOCK_BYTES];
        for r in 0..self.rows {
            for s in 0..self.sbs {
                let meta = &self.meta[r * self.sbs + s];
                let mut q = [0u8; QK_K];
                for h in 0..2 {
                    let u = r * self.units + 2 * s + h;
                    let mut ordered = [0u8; UNIT];
                    unit_order(&self.ql[u].0, &self.qh[u], &mut ordered);
                    let vals: [u8; UNIT] = std::array::from_fn(|j| ordered[POS[j] as usize]);
                    unit::super_of_unit(&vals, self.units, s, h, &mut q);
                }
                let block = Block {
                    d: meta.d,
                    sc: meta.sc,
                    q,
                };
                let at = (r * self.sbs + s) * Q6_K_BLOCK_BYTES;
                write_ggml(&block, &mut out[at..at + Q6_K_BLOCK_BYTES]);
            }
        }
        Ok(out)
    }

    /// Bytes held: low and high bits and scales, padding included.
    pub fn size_bytes(&self) -> usize {
        self.ql.len() * 64 + self.qh.len() * 32 + self.meta.len() * std::mem::size_of::<Meta>()
    }

    /// Appends `other`'s rows after this matrix's (same width), room for
    /// `more` further rows being reserved once.
    pub(crate) fn append_rows(&mut self, other: Self, more: usize) -> Result<()> {
        super::check_append(self.cols, other.cols)?;
        super::extend_rows(&mut self.ql, &other.ql, self.units, more);
        super::extend_rows(&mut self.qh, &other.qh, self.units, more);
        super::extend_rows(&mut self.meta, &other.meta, self.sbs, more);
        self.rows += other.rows;
        Ok(())
    }
}

#[cfg(target_arch = "x86_64")]
impl Q6KMatrix {
    /// Unit `i` (of all rows') 6-bit integers as its two vectors.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn bits512(&self, i: usize) -> (std::arch::x86_64::__m512i, std::arch::x86_64::__m512i) {
        use std::arch::x86_64::*;
        let (lo, hi) = unit::x86::nibbles512(line_bytes(&self.ql).as_ptr().add(i * 64));
        let t = _mm512_broadcast_i64x4(_mm256_loadu_si256(self.qh.as_ptr().add(i).cast()));
        // Bytes 32–63 hold the second bit pair of each field: shift it down.
        let t = _mm512_srlv_epi64(t, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0));
        let m30 = _mm512_set1_epi8(0x30);
        (
            _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(t, 4), m30)),
            _mm512_or_si512(hi, _mm512_and_si512(t, m30)),
        )
    }

    /// Super-block `s` of row `r`'s sixteen group scales `d·sc_g`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn scales512(&self, r: usize, s: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let meta = self.meta.as_ptr().add(r * self.sbs + s);
        let sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            (*meta).sc.as_ptr().cast(),
        )));
        let d = _mm512_broadcastss_ps(unit::x86::f16x1(std::ptr::addr_of!((*meta).d).cast()));
        _mm512_mul_ps(sc, d)
    }
}

/// Lane `l`'s scale group: `[paired unit, lone unit]` (see
/// `unit::column`). Both units of a super-block take group `l`; a row's
/// lone last half super-block holds groups 0–7, two lanes each.
const GROUP_OF_LANE: [[i32; 16]; 2] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7],
];

impl Q6KMatrix {
    /// Which row of [`GROUP_OF_LANE`] unit `u` takes.
    fn lane_map(&self, u: usize) -> usize {
        usize::from(!unit::is_paired(ActScale::Super256, self.units, u))
    }
}

impl UnitFormat for Q6KMatrix {
    const ACTS: ActScale = ActScale::Super256;
    const OFFSET_OF_SCALE: Option<f32> = Some(32.0);

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
        self.units * 96 + self.sbs * std::mem::size_of::<Meta>()
    }

    fn unit_scalar(&self, r: usize, u: usize, out: &mut ScalarUnit) {
        let i = r * self.units + u;
        unit_order(&self.ql[i].0, &self.qh[i], &mut out.q);
        let meta = &self.meta[r * self.sbs + u / 2];
        let d = meta.d.to_f32();
        for ((dl, ol), &g) in out
            .dl
            .iter_mut()
            .zip(&mut out.ol)
            .zip(&GROUP_OF_LANE[self.lane_map(u)])
        {
            *dl = d * meta.sc[g as usize] as f32;
            *ol = 32.0 * *dl;
        }
    }

    fn weight(dl: f32, _ol: f32, q: u8) -> f32 {
        dl * (q as i32 - 32) as f32
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unit_avx512(&self, r: usize, u: usize) -> unit::x86::Unit512 {
        let (q0, q1) = self.bits512(r * self.units + u);
        let f = self.scales512(r, u / 2);
        unit::x86::Unit512 {
            q0,
            q1,
            dl: unit::x86::lanes512(f, &GROUP_OF_LANE[self.lane_map(u)]),
            ol: std::arch::x86_64::_mm512_setzero_ps(),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pair_avx512(&self, r: usize, p: usize) -> [unit::x86::Unit512; 2] {
        // Both units' lane `l` is group `l` (see `unit::column`).
        let dl = self.scales512(r, p);
        let unit = |h: usize| {
            let (q0, q1) = self.bits512(r * self.units + 2 * p + h);
            unit::x86::Unit512 {
                q0,
                q1,
                dl,
                ol: std::arch::x86_64::_mm512_setzero_ps(),
            }
        };
        [unit(0), unit(1)]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn prefetch(&self, r: usize, u: usize) {
        use unit::x86::{prefetch, prefetch_nibbles};
        let at = prefetch_nibbles(self.ql.as_ptr(), self.units, r, u);
        // 32 bytes of high bits per 64 of nibbles, and the scales.
        prefetch(self.qh.as_ptr(), at / 2);
        prefetch(self.meta.as_ptr(), at / 128 * std::mem::size_of::<Meta>());
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unit_avx2(&self, r: usize, u: usize) -> unit::x86::Unit256 {
        use std::arch::x86_64::*;
        let i = r * self.units + u;
        let p = line_bytes(&self.ql).as_ptr().add(i * 64);
        let (a, b) = (
            _mm256_loadu_si256(p.cast()),
            _mm256_loadu_si256(p.add(32).cast()),
        );
        let t = _mm256_loadu_si256(self.qh.as_ptr().add(i).cast());
        let t2 = _mm256_srli_epi16(t, 2);
        // A nibble (low four bits of `lo`) under its two high bits (bits
        // 4–5 of `hi`).
        #[inline]
        #[target_feature(enable = "avx2")]
        unsafe fn join(lo: __m256i, hi: __m256i) -> __m256i {
            _mm256_or_si256(
                _mm256_and_si256(lo, _mm256_set1_epi8(0x0F)),
                _mm256_and_si256(hi, _mm256_set1_epi8(0x30)),
            )
        }
        let q = [
            join(a, _mm256_slli_epi16(t, 4)),
            join(b, _mm256_slli_epi16(t2, 4)),
            join(_mm256_srli_epi16(a, 4), t),
            join(_mm256_srli_epi16(b, 4), t2),
        ];
        let meta = self.meta.as_ptr().add(r * self.sbs + u / 2);
        let scales8 = |at: usize| {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                (*meta).sc.as_ptr().add(at).cast(),
            )))
        };
        let d = _mm256_broadcastss_ps(unit::x86::f16x1(std::ptr::addr_of!((*meta).d).cast()));
        let (lo, hi) = if self.lane_map(u) == 0 {
            // Lanes 0–15 are groups 0–15.
            (_mm256_mul_ps(scales8(0), d), _mm256_mul_ps(scales8(8), d))
        } else {
            // Lanes 0–15 are groups 0–7, two lanes each.
            let f = _mm256_mul_ps(scales8(0), d);
            (
                unit::x86::lanes256(f, &[0, 0, 1, 1, 2, 2, 3, 3]),
                unit::x86::lanes256(f, &[4, 4, 5, 5, 6, 6, 7, 7]),
            )
        };
        let k = _mm256_set1_ps(32.0);
        unit::x86::Unit256 {
            q,
            dl: [lo, hi],
            ol: [_mm256_mul_ps(lo, k), _mm256_mul_ps(hi, k)],
        }
    }
}
