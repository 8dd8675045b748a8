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
#[cfg(target_arch = "x86_64")]
use super::q8_0::line_bytes;
use super::q8_0::{line_bytes_mut, lines, Line};
use super::unit::{
    self, pack_nibbles, round_clamped, unpack_nibbles, ActScale, ScalarUnit, UnitFormat,
};
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

/// Eight values, one per sub-block of a super-block: the fit below runs
/// the eight sub-blocks side by side, one per SIMD lane, so it has no
/// horizontal sums and eight independent searches hide each other's
/// latency (one sub-block at a time, each step waits on the last's
/// divisions and sums).
type Lanes = [f32; 8];

/// The integers `l = round((x − origin) · iscale)` in 0..=15 per lane.
/// (Functions rather than closures: a closure is compiled on its own,
/// without the SIMD features of the function it sits in.)
#[inline(always)]
fn grid(xt: &[Lanes; 32], l: &mut [Lanes; 32], iscale: &Lanes, origin: &Lanes) {
    for (l, x) in l.iter_mut().zip(xt) {
        for j in 0..8 {
            l[j] = round_clamped((x[j] - origin[j]) * iscale[j], 0.0, 15.0);
        }
    }
}

/// `Σ w (s·l + o − x)²` per lane.
#[inline(always)]
fn weighted_error(
    xt: &[Lanes; 32],
    wt: &[Lanes; 32],
    l: &[Lanes; 32],
    s: &Lanes,
    o: &Lanes,
) -> Lanes {
    let mut err = [0f32; 8];
    for ((x, w), l) in xt.iter().zip(wt).zip(l) {
        for j in 0..8 {
            let e = s[j] * l[j] + o[j] - x[j];
            err[j] += w[j] * (e * e);
        }
    }
    err
}

/// The affine grid for each sub-block `j` (column `j` of `xt`, which holds
/// the super-block transposed: `xt[i][j]` is value `i` of sub-block `j`):
/// `(s_j, m_j)` with `x ≈ s·L − m`, `L` in 0..=15, minimising
/// `Σ w (s·L − m − x)²` over the grid spacings tried.
#[inline(always)]
fn fit_sub_blocks(xt: &[Lanes; 32], wt: &[Lanes; 32]) -> (Lanes, Lanes) {
    let (mut hi, mut lo) = ([f32::NEG_INFINITY; 8], [f32::INFINITY; 8]);
    let (mut sum_w, mut sum_x) = ([0f32; 8], [0f32; 8]);
    for (x, w) in xt.iter().zip(wt) {
        for j in 0..8 {
            hi[j] = hi[j].max(x[j]);
            lo[j] = lo[j].min(x[j]);
            sum_w[j] += w[j];
            sum_x[j] += w[j] * x[j];
        }
    }
    // The grid starts at or below zero so that zero stays representable
    // (m ≥ 0).
    let mut origin = lo.map(|v| v.min(0.0));
    // A constant sub-block (range 0) keeps scale 0 and its value as minimum.
    let flat: [bool; 8] = std::array::from_fn(|j| hi[j] <= origin[j]);
    let iscale: Lanes = std::array::from_fn(|j| {
        if flat[j] {
            0.0
        } else {
            15.0 / (hi[j] - origin[j])
        }
    });
    let mut scale: Lanes = iscale.map(|i| 1.0 / i);
    let mut l = [[0f32; 8]; 32];
    grid(xt, &mut l, &iscale, &origin);
    let mut best = weighted_error(xt, wt, &l, &scale, &origin);
    for step in 0..=20 {
        // Spacings from range/14 to range/16: a slightly coarser or finer
        // grid often fits the bulk of the values better than the one that
        // exactly spans the extremes.
        let iscale: Lanes = std::array::from_fn(|j| {
            let range = hi[j] - origin[j];
            if range > 0.0 {
                // (−1 + 0.1·step) + 15 in this order, as llama.cpp
                // computes it: the same roundings give the same blocks.
                ((-1.0 + 0.1 * step as f32) + 15.0) / range
            } else {
                0.0
            }
        });
        grid(xt, &mut l, &iscale, &origin);
        let (mut sl, mut sl2, mut sxl) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for ((x, w), l) in xt.iter().zip(wt).zip(&l) {
            for j in 0..8 {
                let wl = w[j] * l[j];
                sl[j] += wl;
                sl2[j] += wl * l[j];
                sxl[j] += wl * x[j];
            }
        }
        // Weighted least squares for x ≈ s·L + o over this assignment.
        let mut s = [0f32; 8];
        let mut o = [0f32; 8];
        let mut solvable = [false; 8];
        for j in 0..8 {
            let det = sum_w[j] * sl2[j] - sl[j] * sl[j];
            solvable[j] = det > 0.0;
            let det = if solvable[j] { det } else { 1.0 };
            s[j] = (sum_w[j] * sxl[j] - sum_x[j] * sl[j]) / det;
            o[j] = (sl2[j] * sum_x[j] - sl[j] * sxl[j]) / det;
            if o[j] > 0.0 {
                // The format's minimum only lowers: refit the scale alone.
                o[j] = 0.0;
                s[j] = sxl[j] / sl2[j];
            }
        }
        let err = weighted_error(xt, wt, &l, &s, &o);
        for j in 0..8 {
            if solvable[j] && err[j] < best[j] {
                best[j] = err[j];
                scale[j] = s[j];
                origin[j] = o[j];
            }
        }
    }
    for j in 0..8 {
        if flat[j] {
            scale[j] = 0.0;
        }
    }
    (scale, origin.map(|o| -o))
}

unit::simd_dispatch!(quantize_block_simd(x: &[f32; QK_K]) -> Block = quantize_block);

#[inline(always)]
fn quantize_block(x: &[f32; QK_K]) -> Block {
    // Transposed: xt[i][j] is value i of sub-block j. Each value's weight
    // is the sub-block's RMS plus its magnitude: large values matter more.
    let xt: [Lanes; 32] = std::array::from_fn(|i| std::array::from_fn(|j| x[32 * j + i]));
    let mut sq = [0f32; 8];
    for x in &xt {
        for j in 0..8 {
            sq[j] += x[j] * x[j];
        }
    }
    let rms = sq.map(|s| (s / 32.0).sqrt());
    let wt: [Lanes; 32] = std::array::from_fn(|i| std::array::from_fn(|j| rms[j] + xt[i][j].abs()));
    let (scales, mins) = fit_sub_blocks(&xt, &wt);
    // Compared, not `f32::max`: a minimum of −0 must leave `dmin` at +0.
    let largest = |v: &Lanes| v.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    let (max_scale, max_min) = (largest(&scales), largest(&mins));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let six_bits = |v: f32| round_clamped(v, 0.0, 63.0) as u8;
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
            q[i] = round_clamped((x[i] + shift) / step, 0.0, 15.0) as u8;
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
                            let q = unit::unit_of_super(&b.q, units, s, h);
                            // A range of exactly 64 bytes: cannot fail.
                            let out: &mut [u8; 64] = (&mut qs[u * 64..(u + 1) * 64])
                                .try_into()
                                .expect("64-byte unit");
                            pack_nibbles(&q, out);
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
                    let vals = unpack_nibbles(&self.qs[r * self.units + 2 * s + h].0);
                    unit::super_of_unit(&vals, self.units, s, h, &mut q);
                }
                // `sm` holds 16 bytes, split 8 + 8: cannot fail.
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

    /// Bytes held: nibbles and scales, padding included.
    pub fn size_bytes(&self) -> usize {
        self.qs.len() * 64 + self.meta.len() * std::mem::size_of::<Meta>()
    }

    /// Appends `other`'s rows after this matrix's (same width), room for
    /// `more` further rows being reserved once.
    pub(crate) fn append_rows(&mut self, other: Self, more: usize) -> Result<()> {
        super::check_append(self.cols, other.cols)?;
        super::extend_rows(&mut self.qs, &other.qs, self.units, more);
        super::extend_rows(&mut self.meta, &other.meta, self.sbs, more);
        self.rows += other.rows;
        Ok(())
    }
}

impl Q4KMatrix {
    /// Super-block `s` of row `r`'s factors as sixteen floats:
    /// `[d·sc_0 … d·sc_7, dmin·m_0 … dmin·m_7]`.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn scales512(&self, r: usize, s: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let meta = self.meta.as_ptr().add(r * self.sbs + s);
        let sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
            (*meta).sm.as_ptr().cast(),
        )));
        let dm = unit::x86::f16x2((*meta).dm.as_ptr().cast());
        _mm512_mul_ps(sm, unit::x86::lanes512(_mm512_castps128_ps512(dm), &D_DMIN))
    }
}

/// Lane `l`'s sub-block (its scale's index in `sm`; the minimum is 8
/// further on): `[paired unit, lone unit]` (see `unit::column`). Both
/// units of a super-block take sub-block `l / 2`; a row's lone last half
/// super-block holds sub-blocks 0–3, four lanes each.
const SCALE_OF_LANE: [[i32; 16]; 2] = [
    [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7],
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
];
const MIN_OF_LANE: [[i32; 16]; 2] = [
    [8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15],
    [8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11],
];
/// `[d, dmin]` spread to the scales' and the minimums' halves of `sm`.
#[cfg(target_arch = "x86_64")]
const D_DMIN: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];

impl Q4KMatrix {
    /// Which row of [`SCALE_OF_LANE`] unit `u` takes.
    fn lane_map(&self, u: usize) -> usize {
        usize::from(!unit::is_paired(ActScale::Super256, self.units, u))
    }
}

/// The first and last eight of sixteen lane indices.
#[cfg(target_arch = "x86_64")]
fn first8(map: &[i32; 16]) -> [i32; 8] {
    std::array::from_fn(|i| map[i])
}
#[cfg(target_arch = "x86_64")]
fn last8(map: &[i32; 16]) -> [i32; 8] {
    std::array::from_fn(|i| map[8 + i])
}

impl UnitFormat for Q4KMatrix {
    const ACTS: ActScale = ActScale::Super256;
    const OFFSET_OF_SCALE: Option<f32> = None;

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
        let k = self.lane_map(u);
        for l in 0..16 {
            out.dl[l] = d * meta.sm[SCALE_OF_LANE[k][l] as usize] as f32;
            out.ol[l] = dmin * meta.sm[MIN_OF_LANE[k][l] as usize] as f32;
        }
    }

    fn weight(dl: f32, ol: f32, q: u8) -> f32 {
        dl * q as f32 - ol
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unit_avx512(&self, r: usize, u: usize) -> unit::x86::Unit512 {
        let (q0, q1) =
            unit::x86::nibbles512(line_bytes(&self.qs).as_ptr().add((r * self.units + u) * 64));
        let f = self.scales512(r, u / 2);
        let k = self.lane_map(u);
        unit::x86::Unit512 {
            q0,
            q1,
            dl: unit::x86::lanes512(f, &SCALE_OF_LANE[k]),
            ol: unit::x86::lanes512(f, &MIN_OF_LANE[k]),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pair_avx512(&self, r: usize, p: usize) -> [unit::x86::Unit512; 2] {
        let at = line_bytes(&self.qs)
            .as_ptr()
            .add((r * self.units + 2 * p) * 64);
        let f = self.scales512(r, p);
        // Both units' lanes share their sub-blocks (see `unit::column`).
        let (dl, ol) = (
            unit::x86::lanes512(f, &SCALE_OF_LANE[0]),
            unit::x86::lanes512(f, &MIN_OF_LANE[0]),
        );
        let unit = |h: usize| {
            let (q0, q1) = unit::x86::nibbles512(at.add(h * 64));
            unit::x86::Unit512 { q0, q1, dl, ol }
        };
        [unit(0), unit(1)]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn prefetch(&self, r: usize, u: usize) {
        use unit::x86::{prefetch, prefetch_nibbles};
        let at = prefetch_nibbles(self.qs.as_ptr(), self.units, r, u);
        // 20 bytes of scales per 128 bytes of quants.
        prefetch(self.meta.as_ptr(), at / 128 * std::mem::size_of::<Meta>());
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
        // Lanes 0–7 and 8–15 (`sm` indices, which are `fs` and `fm` lanes).
        let map = &SCALE_OF_LANE[self.lane_map(u)];
        let (lo, hi) = (first8(map), last8(map));
        unit::x86::Unit256 {
            q,
            dl: [unit::x86::lanes256(fs, &lo), unit::x86::lanes256(fs, &hi)],
            ol: [unit::x86::lanes256(fm, &lo), unit::x86::lanes256(fm, &hi)],
        }
    }
}
