//! The 128-weight unit layout that the 4- and 6-bit formats (Q4_0, Q4_K,
//! Q6_K) share, the activations quantized to match it, the integer kernels
//! over it and their parallel driver.
//!
//! Each format keeps llama.cpp's numbers (its quants, scales and minimums,
//! bit for bit) but not its byte order: ggml's blocks are laid out for its
//! own kernels, ours for one kernel shape that serves all three formats.
//!
//! # The unit
//!
//! A row is cut into units of [`UNIT`] = 128 weights (the end of the row
//! padded with zero weights to a whole unit). A unit's low four bits are 64
//! bytes (one cache line), read as two 64-byte vectors of integers: vector 0
//! is the low nibbles, vector 1 the high ones. Byte `p` of vector `v` holds
//! weight `8·(p / 4) + 4·v + p % 4` of the unit, so that read as sixteen
//! 32-bit lanes, lane `l` of the two vectors together holds the eight
//! consecutive weights `8l .. 8l + 8`. Q6_K adds its two high bits per weight
//! from 32 more bytes.
//!
//! A unit's weights are the row's next 128 columns for Q4_0. The K formats
//! interleave the two units of each whole super-block instead ([`column`]):
//! lane `l` of unit `h` holds columns `16l + 8h ..+ 8` of the super-block,
//! so lane `l` of both units falls in the same Q4_K sub-block and Q6_K
//! scale group, and one set of lane scales serves the pair.
//!
//! Eight consecutive weights never straddle a block of any of the formats
//! (Q4_0's blocks and Q4_K's sub-blocks are 32 weights, Q6_K's scale groups
//! 16), so every lane has one scale and one offset, and every format's
//! weight is `dl · q − ol` for an unsigned `q` (4 or 6 bits) and per-lane
//! floats `dl` (the scale) and `ol` (the offset): Q4_0 `d·(q − 8)`, Q4_K
//! `d·sc·q − dmin·m`, Q6_K `d·sc·(q − 32)`.
//!
//! # The product
//!
//! Activations are quantized per token to signed bytes in the same order
//! ([`UnitActs`]), with a scale per block of 32 (Q4_0, like Q8_0) or per 256
//! (the K formats, like llama.cpp's Q8_K). For each unit and token the
//! kernels compute, per lane, `A = Σ q·x_q` in integers — one `vpdpbusd`
//! per vector: the unsigned weight bytes times the signed activation bytes
//! is exactly its operand types — and then
//! `acc += f32(A) · dl · dx − ol · bx` in f32, where `dx` is the lane's
//! activation scale and `bx = dx · Σ x_q` over the lane, computed once per
//! token when the activations are quantized. That is two dot-product
//! instructions, a conversion and three float operations per 128 weights
//! and token; for the K formats, whose paired units share their lane
//! scales, the AVX-512 kernel sums a super-block's four dot products in
//! integers and converts and scales once per 256 weights (measured 22–23%
//! faster for Q4_K than a conversion per unit). Decoding the weights
//! (nibbles, high bits, lane scales) happens once per unit and serves every
//! token of a tile.
//!
//! The AVX2 kernel does the same with `vpmaddubsw` (unsigned × signed bytes
//! to i16 pairs; at most 2 · 63 · 127 per pair, and two pairs summed still fit
//! i16) and `vpmaddwd` by ones. The scalar kernel is the portable reference.
//!
//! # Parallelism
//!
//! As for Q8_0 (see `q8_0.rs`): tasks of (a chunk of rows) × (a block of up
//! to 64 tokens) on rayon's global pool, tiles of up to four tokens per pass
//! over a chunk's weights, and several matrices with one input as one pass.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::kernels::Kernel;
use super::q8_0::{chunk_rows, lines, written_outputs, Line, SyncPtr, TOKEN_TILE};
use crate::{Error, Result};

/// Weights per unit.
pub const UNIT: usize = 128;
/// How far ahead (bytes of quants) the kernels prefetch the row they are
/// reading. The hardware prefetcher alone left the kernels waiting on
/// their loads (`perf annotate`: most samples on the instructions right
/// after the weight loads); asking 4 KiB ahead measured 66–70 → 76–79
/// tokens/s for Qwen2.5-0.5B-shape Q4_K decode (2 KiB: 56–79, noisier).
pub(crate) const PREFETCH_BYTES: usize = 4096;
/// 32-bit lanes per unit: each covers eight consecutive weights.
pub(crate) const LANES: usize = 16;
/// Tokens one task takes (see `q8_0.rs`).
const TOKEN_BLOCK: usize = 64;

/// The unit-order position of each weight: `POS[j]` is where weight `j` of
/// a unit sits among the 128 bytes of its two vectors (`v · 64 + p`).
pub(crate) const POS: [u8; UNIT] = {
    let mut pos = [0u8; UNIT];
    let mut j = 0;
    while j < UNIT {
        let (l, v, i) = (j / 8, (j % 8) / 4, j % 4);
        pos[j] = (v * 64 + 4 * l + i) as u8;
        j += 1;
    }
    pos
};

/// The column (within its row) of weight `j` of unit `u`, `j` counted in
/// the unit's natural order (lane `j / 8`; [`POS`] gives its byte).
///
/// For Q4_0 (`Block32`), and for a row's last unit when it has no pair,
/// that is the unit's 128 consecutive columns. The K formats (`Super256`)
/// interleave the two units of a whole super-block instead: lane `l` of
/// unit `h` holds columns `16l + 8h .. 16l + 8h + 8` of the super-block, so
/// lane `l` of both units lies in one Q6_K scale group (16 columns) and one
/// Q4_K sub-block (32). The two units then share their lanes' scales, and
/// the AVX-512 kernel sums both units' integer products before converting
/// and scaling them once.
#[inline]
pub(crate) fn column(scale: ActScale, units: usize, u: usize, j: usize) -> usize {
    if is_paired(scale, units, u) {
        (u / 2) * 2 * UNIT + 16 * (j / 8) + 8 * (u % 2) + j % 8
    } else {
        u * UNIT + j
    }
}

/// Whether unit `u` of a row of `units` is half of an interleaved
/// super-block (see [`column`]).
#[inline]
pub(crate) fn is_paired(scale: ActScale, units: usize, u: usize) -> bool {
    scale == ActScale::Super256 && (u | 1) < units
}

/// Unit `2s + h`'s values in its natural order, out of super-block `s`'s
/// 256 values in column order (a K format's row of `units`).
pub(crate) fn unit_of_super(q: &[u8; 256], units: usize, s: usize, h: usize) -> [u8; UNIT] {
    let (u, c0) = (2 * s + h, 2 * s * UNIT);
    std::array::from_fn(|j| q[column(ActScale::Super256, units, u, j) - c0])
}

/// The inverse of [`unit_of_super`]: puts unit `2s + h`'s values back in
/// the super-block's column order.
pub(crate) fn super_of_unit(
    vals: &[u8; UNIT],
    units: usize,
    s: usize,
    h: usize,
    q: &mut [u8; 256],
) {
    let (u, c0) = (2 * s + h, 2 * s * UNIT);
    for (j, &v) in vals.iter().enumerate() {
        q[column(ActScale::Super256, units, u, j) - c0] = v;
    }
}

/// Packs a unit's 4-bit values (natural order, `q[j] < 16` after masking)
/// into its 64 bytes of nibbles.
pub(crate) fn pack_nibbles(q: &[u8; UNIT], out: &mut [u8; 64]) {
    let mut ordered = [0u8; UNIT];
    for (j, &v) in q.iter().enumerate() {
        ordered[POS[j] as usize] = v & 0x0F;
    }
    for p in 0..64 {
        out[p] = ordered[p] | (ordered[64 + p] << 4);
    }
}

/// The inverse of [`pack_nibbles`]: a unit's 4-bit values in natural order.
pub(crate) fn unpack_nibbles(bytes: &[u8; 64]) -> [u8; UNIT] {
    let mut q = [0u8; UNIT];
    for (j, out) in q.iter_mut().enumerate() {
        let p = POS[j] as usize;
        *out = if p < 64 {
            bytes[p] & 0x0F
        } else {
            bytes[p - 64] >> 4
        };
    }
    q
}

/// `v` clamped to `[lo, hi]` (integers) and rounded to the nearest integer,
/// ties to even. Adding 1.5 · 2²³ leaves no fraction bits (the clamp keeps
/// `|v|` far below 2²²): baseline x86-64 has no rounding instruction
/// (SSE4.1), so `round_ties_even` would be a call into libm per value, and
/// the quantizers round a few hundred times per weight.
#[inline(always)]
pub(crate) fn round_clamped(v: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v.clamp(lo, hi) + MAGIC) - MAGIC
}

/// Defines `fn $name(args) -> R` that runs `$inner` (an
/// `#[inline(always)]` fn) compiled for the CPU at hand: the quantizers'
/// loops over a block vectorize with 512- or 256-bit registers when the
/// function they are inlined into allows it (as `quantize_token_dispatch`
/// does for the activations). Everything `$inner` calls in its loops must
/// be `#[inline(always)]` too; a closure would be compiled on its own,
/// without the features.
macro_rules! simd_dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $inner:path) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::quant::Kernel;
                #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $inner($($arg),*)
                }
                match Kernel::best() {
                    // SAFETY: `best` only returns kernels whose features this
                    // CPU has.
                    Kernel::Avx512Vnni => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Kernel::Avx2 => return unsafe { avx2($($arg),*) },
                    Kernel::Scalar => {}
                }
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// Units per row of `cols` weights.
pub(crate) fn units_for(cols: usize) -> usize {
    cols.div_ceil(UNIT)
}

/// A unit of one row, decoded for the scalar kernel.
pub(crate) struct ScalarUnit {
    /// The 128 weight integers in unit order (vector 0, then vector 1).
    pub q: [u8; UNIT],
    /// Per lane: scale and offset, `w = dl · q − ol`.
    pub dl: [f32; LANES],
    pub ol: [f32; LANES],
}

impl Default for ScalarUnit {
    fn default() -> Self {
        ScalarUnit {
            q: [0; UNIT],
            dl: [0.0; LANES],
            ol: [0.0; LANES],
        }
    }
}

/// How activations are quantized for a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActScale {
    /// One f32 scale per 32 values, like Q8_0 (for Q4_0).
    Block32,
    /// One f32 scale per 256 values, like llama.cpp's Q8_K (for the K
    /// formats, whose scales already vary within 256).
    Super256,
}

impl ActScale {
    fn span(self) -> usize {
        match self {
            ActScale::Block32 => 32,
            ActScale::Super256 => 256,
        }
    }
}

/// What a weight format gives the kernels: its shape and each unit of each
/// row decoded for the kernel at hand.
///
/// The `unsafe` decoders read through raw pointers without bounds checks:
/// callers guarantee `r < rows()` and `u < units()` (the driver checks
/// shapes once per product), and call the SIMD ones only from functions
/// compiled with the features they need.
pub(crate) trait UnitFormat: Sync {
    /// How its activations are quantized.
    const ACTS: ActScale;
    /// `Some(c)` when every lane's offset is `c` times its scale (Q4_0: 8,
    /// Q6_K: 32): the SIMD kernels then sum `dl · bx` and scale the sum by
    /// `c` once per row, and the SIMD decoders leave `ol` unset.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const OFFSET_OF_SCALE: Option<f32>;
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn units(&self) -> usize;
    /// Bytes read per row (quants, high bits, scales), for sizing tasks.
    fn row_bytes(&self) -> usize;
    /// Unit `u` of row `r` for the scalar kernel.
    fn unit_scalar(&self, r: usize, u: usize, out: &mut ScalarUnit);
    /// The weight a decoded integer stands for, with the format's own
    /// operation order (so [`dequantize`] matches llama.cpp's exactly).
    fn weight(dl: f32, ol: f32, q: u8) -> f32;
    /// Unit `u` of row `r` as the AVX-512 kernel reads it (for a row's
    /// last unit when it has no pair).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be available, `r < rows()`, `u < units()`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unit_avx512(&self, r: usize, u: usize) -> x86::Unit512;
    /// Units `2p` and `2p + 1` of row `r` (one super-block of the K
    /// formats, whose scales are then decoded once for both).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be available, `r < rows()`, `2p + 1 < units()`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn pair_avx512(&self, r: usize, p: usize) -> [x86::Unit512; 2];
    /// Asks the memory system for the data that units `u` and `u + 1` of
    /// row `r` will need [`PREFETCH_BYTES`] of quants later (their quants
    /// and, proportionally ahead, their scales). Addresses past the end are
    /// harmless: a prefetch never faults.
    ///
    /// # Safety
    /// SSE must be available (every x86-64 has it).
    #[cfg(target_arch = "x86_64")]
    unsafe fn prefetch(&self, r: usize, u: usize);
    /// Unit `u` of row `r` as the AVX2 kernel reads it.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, `r < rows()`, `u < units()`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unit_avx2(&self, r: usize, u: usize) -> x86::Unit256;

    /// Back to dense f32 `[rows, cols]`, in the format's own operation
    /// order (llama.cpp's `dequantize_row_*`).
    fn dequantize(&self) -> Vec<f32>
    where
        Self: Sized,
    {
        dequantize(self)
    }

    /// `x · Wᵀ` for `x` row-major `[tokens, cols]`: `[tokens, rows]`, with
    /// the best kernel this CPU has.
    fn matmul(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        matmul(Kernel::best(), self, x, tokens)
    }

    /// [`Self::matmul`] with a chosen kernel (for tests and benchmarks).
    fn matmul_with(&self, kernel: Kernel, x: &[f32], tokens: usize) -> Result<Vec<f32>>
    where
        Self: Sized,
    {
        matmul(kernel, self, x, tokens)
    }
}

/// Dense `[rows, cols]` f32 weights of any unit format.
pub(crate) fn dequantize<F: UnitFormat>(m: &F) -> Vec<f32> {
    let (rows, cols, units) = (m.rows(), m.cols(), m.units());
    let mut out = vec![0f32; rows * cols];
    let mut unit = ScalarUnit::default();
    for (r, row) in out.chunks_exact_mut(cols).enumerate() {
        for u in 0..units {
            m.unit_scalar(r, u, &mut unit);
            for (j, &p) in POS.iter().enumerate() {
                let c = column(F::ACTS, units, u, j);
                if c < cols {
                    row[c] = F::weight(unit.dl[j / 8], unit.ol[j / 8], unit.q[p as usize]);
                }
            }
        }
    }
    out
}

/// Activations `[tokens, cols]` quantized to signed bytes in unit order,
/// with per-lane scales and scaled sums (see the module docs).
pub struct UnitActs {
    tokens: usize,
    cols: usize,
    units: usize,
    scale: ActScale,
    /// `tokens × units × 128` signed bytes (as u8), 64-byte aligned.
    q: Vec<Line>,
    /// `tokens × units × 16`: each lane's scale.
    d: Vec<f32>,
    /// `tokens × units × 16`: each lane's scale times the sum of its
    /// eight integers.
    b: Vec<f32>,
}

/// One token's quantized activations, as the kernels read them.
#[derive(Clone, Copy)]
pub(crate) struct TokenActs<'a> {
    pub q: &'a [u8],
    pub d: &'a [f32],
    pub b: &'a [f32],
}

impl UnitActs {
    /// Quantizes row-major `[tokens, cols]` values, tokens in parallel when
    /// there are many.
    pub fn quantize(x: &[f32], tokens: usize, cols: usize, scale: ActScale) -> Result<Self> {
        if tokens == 0 || cols == 0 || x.len() != tokens * cols {
            return Err(Error::InvalidRequest(format!(
                "cannot quantize {} activations as [{tokens}, {cols}]",
                x.len()
            )));
        }
        let units = units_for(cols);
        let mut q = lines(tokens * units * UNIT);
        let mut d = vec![0f32; tokens * units * LANES];
        let mut b = vec![0f32; tokens * units * LANES];
        let bytes = &mut super::q8_0::line_bytes_mut(&mut q)[..tokens * units * UNIT];
        type Row<'a> = ((&'a mut [u8], &'a mut [f32]), (&'a mut [f32], &'a [f32]));
        let one = |((q, d), (b, x)): Row<'_>| quantize_token_dispatch(x, scale, q, d, b);
        if tokens >= 16 {
            bytes
                .par_chunks_mut(units * UNIT)
                .zip(d.par_chunks_mut(units * LANES))
                .zip(b.par_chunks_mut(units * LANES).zip(x.par_chunks(cols)))
                .for_each(one);
        } else {
            bytes
                .chunks_mut(units * UNIT)
                .zip(d.chunks_mut(units * LANES))
                .zip(b.chunks_mut(units * LANES).zip(x.chunks(cols)))
                .for_each(one);
        }
        Ok(UnitActs {
            tokens,
            cols,
            units,
            scale,
            q,
            d,
            b,
        })
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Back to dense f32 `[tokens, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let q = super::q8_0::line_bytes(&self.q);
        let mut out = vec![0f32; self.tokens * self.cols];
        for (t, row) in out.chunks_exact_mut(self.cols).enumerate() {
            for u in 0..self.units {
                for (j, &p) in POS.iter().enumerate() {
                    let c = column(self.scale, self.units, u, j);
                    if c < self.cols {
                        let v = q[(t * self.units + u) * UNIT + p as usize] as i8;
                        row[c] = v as f32 * self.d[(t * self.units + u) * LANES + j / 8];
                    }
                }
            }
        }
        out
    }

    pub(crate) fn token(&self, t: usize) -> TokenActs<'_> {
        let q = super::q8_0::line_bytes(&self.q);
        let (qs, ls) = (self.units * UNIT, self.units * LANES);
        TokenActs {
            q: &q[t * qs..(t + 1) * qs],
            d: &self.d[t * ls..(t + 1) * ls],
            b: &self.b[t * ls..(t + 1) * ls],
        }
    }
}

/// Quantizes one token: spans of `scale.span()` values share a scale
/// `amax / 127`, values round to nearest (ties to even, as in `q8_0.rs`),
/// and each unit is stored in unit order with its lanes' scales and sums.
#[inline(always)]
fn quantize_token(x: &[f32], scale: ActScale, q: &mut [u8], d: &mut [f32], b: &mut [f32]) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it leaves no fraction bits
    let span = scale.span();
    let units = q.len() / UNIT;
    // Chunks of whole spans and whole units: 128 values for Block32, 256
    // for Super256 (whose last chunk may hold one unit).
    let chunk = span.max(UNIT);
    let mut vals = [0f32; 256];
    let mut ints = [0i8; 256];
    let mut scales = [0f32; 8]; // per 32 values of the chunk
    for c0 in (0..units * UNIT).step_by(chunk) {
        let present = x.len().saturating_sub(c0).min(chunk);
        vals[..present].copy_from_slice(&x[c0..c0 + present]);
        vals[present..].fill(0.0);
        for s in (0..chunk).step_by(span) {
            let v = &vals[s..s + span];
            let amax = v.iter().fold(0f32, |m, &a| m.max(a.abs()));
            let ds = amax / 127.0;
            let id = if ds > 0.0 { 1.0 / ds } else { 0.0 };
            for (o, &a) in ints[s..s + span].iter_mut().zip(v) {
                *o = (((a * id + MAGIC) - MAGIC) as i32).clamp(-127, 127) as i8;
            }
            scales[s / 32..(s + span) / 32].fill(ds);
        }
        for uu in 0..chunk / UNIT {
            let u = c0 / UNIT + uu;
            if u >= units {
                break;
            }
            // The unit's values in its natural order (see `column`).
            let mut own = [0i8; UNIT];
            for (j, o) in own.iter_mut().enumerate() {
                *o = ints[column(scale, units, u, j) - c0];
            }
            let ints = &own;
            let (v0, v1) = q[u * UNIT..(u + 1) * UNIT].split_at_mut(64);
            // Unit order (see `POS`) as whole words: vector 0 takes the
            // natural order's even 4-byte words, vector 1 the odd ones.
            for (w, eight) in ints.chunks_exact(8).enumerate() {
                for i in 0..4 {
                    v0[4 * w + i] = eight[i] as u8;
                    v1[4 * w + i] = eight[4 + i] as u8;
                }
            }
            for l in 0..LANES {
                let ds = scales[(column(scale, units, u, 8 * l) - c0) / 32];
                let sum: i32 = ints[8 * l..8 * l + 8].iter().map(|&v| v as i32).sum();
                d[u * LANES + l] = ds;
                b[u * LANES + l] = ds * sum as f32;
            }
        }
    }
}

/// [`quantize_token`] compiled for the CPU at hand (see `q8_0.rs`).
fn quantize_token_dispatch(x: &[f32], scale: ActScale, q: &mut [u8], d: &mut [f32], b: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn avx512(x: &[f32], s: ActScale, q: &mut [u8], d: &mut [f32], b: &mut [f32]) {
            quantize_token(x, s, q, d, b)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], s: ActScale, q: &mut [u8], d: &mut [f32], b: &mut [f32]) {
            quantize_token(x, s, q, d, b)
        }
        match Kernel::best() {
            // SAFETY: `best` only returns kernels whose features this CPU has.
            Kernel::Avx512Vnni => return unsafe { avx512(x, scale, q, d, b) },
            // SAFETY: as above.
            Kernel::Avx2 => return unsafe { avx2(x, scale, q, d, b) },
            Kernel::Scalar => {}
        }
    }
    quantize_token(x, scale, q, d, b)
}

/// `x · Wᵀ` for one matrix: quantizes `x` (`[tokens, cols]`) and returns
/// `[tokens, rows]`.
pub(crate) fn matmul<F: UnitFormat>(
    kernel: Kernel,
    m: &F,
    x: &[f32],
    tokens: usize,
) -> Result<Vec<f32>> {
    let acts = UnitActs::quantize(x, tokens, m.cols(), F::ACTS)?;
    let mut outs = written_outputs([tokens * m.rows()].into_iter(), |views| {
        run_group(kernel, &[m], &[&acts], views)
    })?;
    Ok(outs.pop().unwrap_or_default())
}

/// Products of several matrices of one format and width with the same
/// input, as one parallel pass (the input quantized once).
pub(crate) fn matmul_many<F: UnitFormat>(
    kernel: Kernel,
    mats: &[&F],
    x: &[f32],
    tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let Some(first) = mats.first() else {
        return Ok(Vec::new());
    };
    let acts = UnitActs::quantize(x, tokens, first.cols(), F::ACTS)?;
    let each = vec![&acts; mats.len()];
    written_outputs(mats.iter().map(|m| tokens * m.rows()), |views| {
        run_group(kernel, mats, &each, views)
    })
}

/// Products of several matrices of one format, each with its own input (a
/// mixture-of-experts layer's experts, each over the tokens routed to it),
/// as one parallel pass. Matrix `i` reads `inputs[which[i]]` (`[tokens,
/// cols]`), quantized once however many matrices read it; returns one
/// `[tokens, rows]` output per matrix.
pub(crate) fn matmul_grouped<F: UnitFormat>(
    kernel: Kernel,
    mats: &[&F],
    which: &[usize],
    inputs: &[(&[f32], usize)],
) -> Result<Vec<Vec<f32>>> {
    let mut acts: Vec<Option<UnitActs>> = (0..inputs.len()).map(|_| None).collect();
    for (m, &j) in mats.iter().zip(which) {
        let slot = acts
            .get_mut(j)
            .ok_or_else(|| Error::InvalidRequest(format!("no input {j} for a grouped product")))?;
        if slot.is_none() {
            let (x, tokens) = inputs[j];
            *slot = Some(UnitActs::quantize(x, tokens, m.cols(), F::ACTS)?);
        }
    }
    let refs: Vec<&UnitActs> = which.iter().filter_map(|&j| acts[j].as_ref()).collect();
    written_outputs(
        mats.iter().zip(&refs).map(|(m, a)| a.tokens * m.rows()),
        |views| run_group(kernel, mats, &refs, views),
    )
}

/// The parallel pass: tasks of (matrix, chunk of rows, block of tokens),
/// each writing its own rectangle of its matrix's `[tokens, rows]` output.
/// `acts[i]` are matrix `i`'s activations.
pub(crate) fn run_group<F: UnitFormat>(
    kernel: Kernel,
    mats: &[&F],
    acts: &[&UnitActs],
    outs: &mut [&mut [MaybeUninit<f32>]],
) -> Result<()> {
    if !kernel.is_available() {
        return Err(Error::Device(format!(
            "the {kernel:?} kernel needs CPU features this machine lacks"
        )));
    }
    if mats.len() != outs.len() || mats.len() != acts.len() {
        return Err(Error::InvalidRequest(format!(
            "{} matrices, {} activations, {} outputs",
            mats.len(),
            acts.len(),
            outs.len()
        )));
    }
    // Per matrix: (rows per chunk, chunks, first task, output).
    let mut plan = Vec::with_capacity(mats.len());
    let mut tasks = 0;
    for ((m, out), acts) in mats.iter().zip(outs.iter_mut()).zip(acts) {
        let tokens = acts.tokens;
        let token_blocks = tokens.div_ceil(TOKEN_BLOCK);
        if acts.cols != m.cols() || acts.scale != F::ACTS || out.len() != tokens * m.rows() {
            return Err(Error::InvalidRequest(format!(
                "quantized product: weights [{}, {}], activations [{}, {}], output of {} values",
                m.rows(),
                m.cols(),
                tokens,
                acts.cols,
                out.len()
            )));
        }
        let chunk = chunk_rows(m.rows(), m.row_bytes(), tokens);
        let chunks = m.rows().div_ceil(chunk);
        plan.push((
            chunk,
            chunks,
            tasks,
            SyncPtr(out.as_mut_ptr().cast::<f32>()),
        ));
        tasks += chunks * token_blocks;
    }
    let task = |i: usize| {
        let mi = plan.partition_point(|p| p.2 <= i) - 1;
        let (chunk, chunks, first, out) = plan[mi];
        let (m, acts) = (mats[mi], acts[mi]);
        let local = i - first;
        let (rc, tb) = (local % chunks, local / chunks);
        let r0 = rc * chunk;
        let r1 = (r0 + chunk).min(m.rows());
        let t1 = ((tb + 1) * TOKEN_BLOCK).min(acts.tokens);
        let mut t0 = tb * TOKEN_BLOCK;
        while t0 < t1 {
            let n = (t1 - t0).min(TOKEN_TILE);
            match n {
                4 => tile::<F, 4>(kernel, m, acts, t0, r0, r1, out),
                3 => tile::<F, 3>(kernel, m, acts, t0, r0, r1, out),
                2 => tile::<F, 2>(kernel, m, acts, t0, r0, r1, out),
                _ => tile::<F, 1>(kernel, m, acts, t0, r0, r1, out),
            }
            t0 += n;
        }
    };
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    Ok(())
}

/// Rows a kernel call writes into its stack buffer.
const ROW_BATCH: usize = 64;

/// Rows `r0..r1` of `m` for tokens `t0..t0 + T`, written into `out`
/// (`[tokens, rows]`).
fn tile<F: UnitFormat, const T: usize>(
    kernel: Kernel,
    m: &F,
    acts: &UnitActs,
    t0: usize,
    r0: usize,
    r1: usize,
    out: SyncPtr,
) {
    let x: [TokenActs<'_>; T] = std::array::from_fn(|k| acts.token(t0 + k));
    let mut buf = [0f32; ROW_BATCH * TOKEN_TILE];
    let rows = m.rows();
    let mut r = r0;
    while r < r1 {
        let n = (r1 - r).min(ROW_BATCH);
        run::<F, T>(kernel, m, r, n, &x, &mut buf[..n * T]);
        for i in 0..n {
            for k in 0..T {
                // SAFETY: `(t0 + k, r + i)` is inside the `[tokens, rows]`
                // output, and tasks own disjoint (row chunk, token block)
                // rectangles of it, so no two threads write one element.
                unsafe { *out.0.add((t0 + k) * rows + r + i) = buf[i * T + k] };
            }
        }
        r += n;
    }
}

/// Dot products of rows `r0..r0 + n` of `m` with `T` tokens:
/// `out[i · T + k]` for row `r0 + i` and token `k`.
///
/// # Panics
/// If the CPU lacks the kernel's features or the shapes disagree; both are
/// bugs in the caller (the driver checks input shapes first).
fn run<F: UnitFormat, const T: usize>(
    kernel: Kernel,
    m: &F,
    r0: usize,
    n: usize,
    x: &[TokenActs<'_>; T],
    out: &mut [f32],
) {
    let units = m.units();
    assert!(r0 + n <= m.rows() && out.len() == n * T);
    for a in x {
        assert!(a.q.len() == units * UNIT && a.d.len() == units * LANES && a.b.len() == a.d.len());
    }
    assert!(
        kernel.is_available(),
        "{kernel:?} is not available on this CPU"
    );
    match kernel {
        Kernel::Scalar => scalar(m, r0, n, x, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were checked just above, and the rows and
        // the activations' lengths match the matrix, which is all the
        // pointer arithmetic relies on.
        Kernel::Avx512Vnni => unsafe { x86::avx512_vnni(m, r0, n, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { x86::avx2(m, r0, n, x, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("checked by is_available"),
    }
}

fn scalar<F: UnitFormat, const T: usize>(
    m: &F,
    r0: usize,
    n: usize,
    x: &[TokenActs<'_>; T],
    out: &mut [f32],
) {
    let mut unit = ScalarUnit::default();
    for i in 0..n {
        let mut acc = [0f32; T];
        for u in 0..m.units() {
            m.unit_scalar(r0 + i, u, &mut unit);
            for (k, acc) in acc.iter_mut().enumerate() {
                let xq = &x[k].q[u * UNIT..(u + 1) * UNIT];
                let xd = &x[k].d[u * LANES..(u + 1) * LANES];
                let xb = &x[k].b[u * LANES..(u + 1) * LANES];
                for l in 0..LANES {
                    let mut a = 0i32;
                    for v in 0..2 {
                        for j in 0..4 {
                            let p = v * 64 + 4 * l + j;
                            a += unit.q[p] as i32 * xq[p] as i8 as i32;
                        }
                    }
                    *acc += a as f32 * (unit.dl[l] * xd[l]) - unit.ol[l] * xb[l];
                }
            }
        }
        out[i * T..(i + 1) * T].copy_from_slice(&acc);
    }
}

#[cfg(target_arch = "x86_64")]
// Index loops over the per-token register arrays read more plainly than
// zipping several of them.
#[allow(clippy::needless_range_loop)]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{ActScale, TokenActs, UnitFormat, LANES, UNIT};

    /// One unit for the AVX-512 kernel: the two vectors of weight integers
    /// and the sixteen lanes' scales and offsets (`ol` unset when the
    /// format has `OFFSET_OF_SCALE`).
    #[derive(Clone, Copy)]
    pub(crate) struct Unit512 {
        pub q0: __m512i,
        pub q1: __m512i,
        pub dl: __m512,
        pub ol: __m512,
    }

    /// One unit for the AVX2 kernel: the vectors in halves
    /// (`[v0 lanes 0–7, v0 lanes 8–15, v1 lanes 0–7, v1 lanes 8–15]`) and
    /// the lanes' scales and offsets in halves.
    #[derive(Clone, Copy)]
    pub(crate) struct Unit256 {
        pub q: [__m256i; 4],
        pub dl: [__m256; 2],
        pub ol: [__m256; 2],
    }

    /// `Σ q·x` per lane of one unit and token: two `vpdpbusd`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot512(w: &Unit512, xq: *const u8) -> __m512i {
        dot512_from(_mm512_setzero_si512(), w, xq)
    }

    /// `a` plus one unit's `Σ q·x` per lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot512_from(a: __m512i, w: &Unit512, xq: *const u8) -> __m512i {
        let a = _mm512_dpbusd_epi32(a, w.q0, _mm512_loadu_si512(xq.cast()));
        _mm512_dpbusd_epi32(a, w.q1, _mm512_loadu_si512(xq.add(64).cast()))
    }

    /// See the module docs. Units go in pairs (a K format's super-block),
    /// the last alone when a row has an odd number. Two accumulators per
    /// token (the scaled products, the offsets) keep each FMA chain short.
    /// With a scale per 256 activations (the K formats) a pair's two units
    /// are summed before their common activation scale is applied.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn avx512_vnni<F: UnitFormat, const T: usize>(
        m: &F,
        r0: usize,
        n: usize,
        x: &[TokenActs<'_>; T],
        out: &mut [f32],
    ) {
        let units = m.units();
        // The offset term per lane: `ol · bx`, or `dl · bx` scaled by `c`
        // at the end.
        let offset = |w: &Unit512| match F::OFFSET_OF_SCALE {
            Some(_) => w.dl,
            None => w.ol,
        };
        let c = F::OFFSET_OF_SCALE.unwrap_or(1.0);
        for i in 0..n {
            let r = r0 + i;
            let mut acc = [_mm512_setzero_ps(); T];
            let mut off = [_mm512_setzero_ps(); T];
            for p in 0..units / 2 {
                m.prefetch(r, 2 * p);
                let w = m.pair_avx512(r, p);
                let u = 2 * p;
                for k in 0..T {
                    let xq = x[k].q.as_ptr().add(u * UNIT);
                    let xd = x[k].d.as_ptr().add(u * LANES);
                    let xb = x[k].b.as_ptr().add(u * LANES);
                    match F::ACTS {
                        ActScale::Super256 => {
                            // The two units share their lanes' scales and
                            // offsets (see `column`): one integer sum, one
                            // conversion, one scaling for both.
                            let a = dot512_from(dot512(&w[0], xq), &w[1], xq.add(UNIT));
                            let s = _mm512_mul_ps(w[0].dl, _mm512_set1_ps(*xd));
                            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, acc[k]);
                            let b =
                                _mm512_add_ps(_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(LANES)));
                            off[k] = _mm512_fmadd_ps(offset(&w[0]), b, off[k]);
                        }
                        ActScale::Block32 => {
                            let a0 = _mm512_cvtepi32_ps(dot512(&w[0], xq));
                            let a1 = _mm512_cvtepi32_ps(dot512(&w[1], xq.add(UNIT)));
                            let s0 = _mm512_mul_ps(w[0].dl, _mm512_loadu_ps(xd));
                            let s1 = _mm512_mul_ps(w[1].dl, _mm512_loadu_ps(xd.add(LANES)));
                            acc[k] = _mm512_fmadd_ps(a0, s0, acc[k]);
                            acc[k] = _mm512_fmadd_ps(a1, s1, acc[k]);
                            off[k] = _mm512_fmadd_ps(offset(&w[0]), _mm512_loadu_ps(xb), off[k]);
                            let b1 = _mm512_loadu_ps(xb.add(LANES));
                            off[k] = _mm512_fmadd_ps(offset(&w[1]), b1, off[k]);
                        }
                    }
                }
            }
            if units % 2 == 1 {
                let u = units - 1;
                let w = m.unit_avx512(r, u);
                for k in 0..T {
                    let a = _mm512_cvtepi32_ps(dot512(&w, x[k].q.as_ptr().add(u * UNIT)));
                    let s = _mm512_mul_ps(w.dl, _mm512_loadu_ps(x[k].d.as_ptr().add(u * LANES)));
                    acc[k] = _mm512_fmadd_ps(a, s, acc[k]);
                    let b = _mm512_loadu_ps(x[k].b.as_ptr().add(u * LANES));
                    off[k] = _mm512_fmadd_ps(offset(&w), b, off[k]);
                }
            }
            for k in 0..T {
                *out.get_unchecked_mut(i * T + k) =
                    _mm512_reduce_add_ps(_mm512_fnmadd_ps(off[k], _mm512_set1_ps(c), acc[k]));
            }
        }
    }

    /// See the module docs: per half unit, two `vpmaddubsw` summed in i16
    /// and widened by `vpmaddwd` with ones.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2<F: UnitFormat, const T: usize>(
        m: &F,
        r0: usize,
        n: usize,
        x: &[TokenActs<'_>; T],
        out: &mut [f32],
    ) {
        let ones = _mm256_set1_epi16(1);
        let c = F::OFFSET_OF_SCALE.unwrap_or(1.0);
        for i in 0..n {
            let mut acc = [_mm256_setzero_ps(); T];
            let mut off = [_mm256_setzero_ps(); T];
            for u in 0..m.units() {
                if u % 2 == 0 {
                    m.prefetch(r0 + i, u);
                }
                let w = m.unit_avx2(r0 + i, u);
                for k in 0..T {
                    let xq = x[k].q.as_ptr().add(u * UNIT);
                    let xd = x[k].d.as_ptr().add(u * LANES);
                    let xb = x[k].b.as_ptr().add(u * LANES);
                    for h in 0..2 {
                        let x0 = _mm256_loadu_si256(xq.add(32 * h).cast());
                        let x1 = _mm256_loadu_si256(xq.add(64 + 32 * h).cast());
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(w.q[h], x0),
                            _mm256_maddubs_epi16(w.q[2 + h], x1),
                        );
                        let a = _mm256_madd_epi16(p, ones);
                        let s = _mm256_mul_ps(w.dl[h], _mm256_loadu_ps(xd.add(8 * h)));
                        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), s, acc[k]);
                        let o = match F::OFFSET_OF_SCALE {
                            Some(_) => w.dl[h],
                            None => w.ol[h],
                        };
                        off[k] = _mm256_fmadd_ps(o, _mm256_loadu_ps(xb.add(8 * h)), off[k]);
                    }
                }
            }
            for k in 0..T {
                *out.get_unchecked_mut(i * T + k) =
                    hsum256(_mm256_fnmadd_ps(off[k], _mm256_set1_ps(c), acc[k]));
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

    /// Prefetches `base + offset` into all cache levels (no bounds: a
    /// prefetch of any address is harmless, and the pointer is never read).
    #[inline(always)]
    pub(crate) unsafe fn prefetch<T>(base: *const T, offset_bytes: usize) {
        _mm_prefetch::<_MM_HINT_T0>(base.cast::<i8>().wrapping_add(offset_bytes));
    }

    /// Prefetches the two 64-byte lines of a unit's nibbles (`qs`, 64 bytes
    /// a unit) that unit `u` of row `r` of a `units`-wide matrix is
    /// followed by [`super::PREFETCH_BYTES`] later, and returns that
    /// offset into `qs` so a format can prefetch its other arrays in
    /// proportion.
    #[inline(always)]
    pub(crate) unsafe fn prefetch_nibbles<T>(
        qs: *const T,
        units: usize,
        r: usize,
        u: usize,
    ) -> usize {
        let at = (r * units + u) * 64 + super::PREFETCH_BYTES;
        prefetch(qs, at);
        prefetch(qs, at + 64);
        at
    }

    /// A unit's 64 bytes of nibbles as its two vectors (AVX-512).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) unsafe fn nibbles512(p: *const u8) -> (__m512i, __m512i) {
        let b = _mm512_loadu_si512(p.cast());
        let m = _mm512_set1_epi8(0x0F);
        (
            _mm512_and_si512(b, m),
            _mm512_and_si512(_mm512_srli_epi16(b, 4), m),
        )
    }

    /// A unit's 64 bytes of nibbles as the four halves of [`Unit256::q`].
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn nibbles256(p: *const u8) -> [__m256i; 4] {
        let m = _mm256_set1_epi8(0x0F);
        let a = _mm256_loadu_si256(p.cast());
        let b = _mm256_loadu_si256(p.add(32).cast());
        [
            _mm256_and_si256(a, m),
            _mm256_and_si256(b, m),
            _mm256_and_si256(_mm256_srli_epi16(a, 4), m),
            _mm256_and_si256(_mm256_srli_epi16(b, 4), m),
        ]
    }

    /// Lane `l` of the result is `v[idx[l]]`, for 16 lanes (AVX-512).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn lanes512(v: __m512, idx: &[i32; 16]) -> __m512 {
        _mm512_permutexvar_ps(_mm512_loadu_si512(idx.as_ptr().cast()), v)
    }

    /// Lane `l` of the result is `v[idx[l]]`, for 8 lanes (AVX2).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn lanes256(v: __m256, idx: &[i32; 8]) -> __m256 {
        _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(idx.as_ptr().cast()))
    }

    /// Four f16 values at `p` (8 bytes) to f32 (F16C).
    #[inline]
    #[target_feature(enable = "f16c")]
    pub(crate) unsafe fn f16x4(p: *const u16) -> __m128 {
        _mm_cvtph_ps(_mm_loadl_epi64(p.cast()))
    }

    /// Two f16 values at `p` (4 bytes) to f32 in lanes 0 and 1 (F16C).
    #[inline]
    #[target_feature(enable = "f16c")]
    pub(crate) unsafe fn f16x2(p: *const u16) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()))
    }

    /// One f16 value at `p` to f32 in every lane (F16C).
    #[inline]
    #[target_feature(enable = "f16c,avx2")]
    pub(crate) unsafe fn f16x1(p: *const u16) -> __m128 {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(p.read_unaligned() as i32));
        _mm_broadcastss_ps(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_positions_are_a_permutation_with_eight_weights_a_lane() {
        let mut seen = [false; UNIT];
        for (j, &p) in POS.iter().enumerate() {
            let p = p as usize;
            assert!(!seen[p]);
            seen[p] = true;
            // Lane of byte p (in either vector) is (p % 64) / 4.
            assert_eq!((p % 64) / 4, j / 8);
        }
        let q: [u8; UNIT] = std::array::from_fn(|j| (j * 7 % 16) as u8);
        let mut packed = [0u8; 64];
        pack_nibbles(&q, &mut packed);
        assert_eq!(unpack_nibbles(&packed), q);
    }

    #[test]
    fn activations_round_trip_within_half_a_step() -> Result<()> {
        let cols = 300; // two units and a partial third
        let x: Vec<f32> = (0..2 * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01)
            .collect();
        for scale in [ActScale::Block32, ActScale::Super256] {
            let a = UnitActs::quantize(&x, 2, cols, scale)?;
            let y = a.dequantize();
            for t in 0..2 {
                for c in 0..cols {
                    let span = scale.span();
                    // (Super256: 300 columns are one interleaved super-block
                    // and a lone unit, so both orders are exercised.)
                    let s0 = c / span * span;
                    let amax = x[t * cols + s0..t * cols + (s0 + span).min(cols)]
                        .iter()
                        .fold(0f32, |m, v| m.max(v.abs()));
                    let err = (x[t * cols + c] - y[t * cols + c]).abs();
                    assert!(err <= amax / 127.0 * 0.5 + 1e-6, "{scale:?} [{t},{c}]");
                }
                // The lanes' sums agree with the integers.
                let tok = a.token(t);
                for u in 0..a.units {
                    for l in 0..LANES {
                        let sum: i32 = (0..8)
                            .map(|j| tok.q[u * UNIT + POS[8 * l + j] as usize] as i8 as i32)
                            .sum();
                        let (d, b) = (tok.d[u * LANES + l], tok.b[u * LANES + l]);
                        assert_eq!(b, d * sum as f32);
                    }
                }
            }
        }
        Ok(())
    }
}
