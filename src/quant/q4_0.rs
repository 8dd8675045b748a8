//! The Q4_0 format (`--quant q4_0`): llama.cpp's `block_q4_0`, blocks of
//! [`QK4_0`] = 32 weights with one f16 scale `d` and 4-bit integers `q`,
//! weight `d · (q − 8)`. 4.5 bits a weight.
//!
//! Quantizing follows llama.cpp's reference: `d = m / −8` for the value `m`
//! of largest magnitude (so `m` itself is exact, at `q = 0`), and
//! `q = min(15, ⌊x / d + 8.5⌋)`.
//!
//! Stored in the unit layout of `unit.rs`: per 128 weights, 64 bytes of
//! nibbles and the four blocks' f16 scales; the same 18 bytes per 32 weights
//! as ggml. Activations are quantized like Q8_0's (a scale per 32).

use half::f16;
use rayon::prelude::*;

use super::check_ggml;
#[cfg(target_arch = "x86_64")]
use super::q8_0::line_bytes;
use super::q8_0::{line_bytes_mut, lines, Line};
use super::unit::{self, pack_nibbles, unpack_nibbles, ActScale, ScalarUnit, UnitFormat, UNIT};
use crate::{Error, Result};

/// Weights per block.
pub const QK4_0: usize = 32;
/// Bytes of one ggml `block_q4_0`: f16 `d`, then 16 bytes of nibbles.
pub const Q4_0_BLOCK_BYTES: usize = 18;
const BLOCKS_PER_UNIT: usize = UNIT / QK4_0;

/// A weight matrix `[rows, cols]` in Q4_0.
#[derive(Clone)]
pub struct Q40Matrix {
    rows: usize,
    cols: usize,
    units: usize,
    /// `rows × units` lines of nibbles (see `unit.rs`).
    qs: Vec<Line>,
    /// `rows × units`: the scales of each unit's four blocks.
    d: Vec<[f16; BLOCKS_PER_UNIT]>,
}

impl std::fmt::Debug for Q40Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q40Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// One block: its scale and its 32 integers (0..=15) in order.
struct Block {
    d: f16,
    q: [u8; QK4_0],
}

fn quantize_block(x: &[f32]) -> Block {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [8u8; QK4_0];
    for (q, &v) in q.iter_mut().zip(x) {
        // x / d lies in [−8, 8]: +8.5 and the floor round half up.
        *q = ((v * id + 8.5).floor() as i32).clamp(0, 15) as u8;
    }
    Block {
        d: f16::from_f32(d),
        q,
    }
}

fn parse_ggml(b: &[u8]) -> Block {
    let mut q = [0u8; QK4_0];
    for j in 0..16 {
        q[j] = b[2 + j] & 0x0F;
        q[j + 16] = b[2 + j] >> 4;
    }
    Block {
        d: f16::from_le_bytes([b[0], b[1]]),
        q,
    }
}

fn write_ggml(block: &Block, out: &mut [u8]) {
    out[..2].copy_from_slice(&block.d.to_le_bytes());
    for j in 0..16 {
        out[2 + j] = block.q[j] | (block.q[j + 16] << 4);
    }
}

impl Q40Matrix {
    /// An all-zero matrix to fill row by row.
    fn zeroed(rows: usize, cols: usize) -> Self {
        let units = unit::units_for(cols);
        Q40Matrix {
            rows,
            cols,
            units,
            qs: lines(rows * units * 64),
            d: vec![[f16::ZERO; BLOCKS_PER_UNIT]; rows * units],
        }
    }

    /// Fills every row from its blocks, rows in parallel: `block(r, b)`
    /// gives block `b` of row `r` (only for blocks inside `cols`).
    fn fill(&mut self, block: impl Fn(usize, usize) -> Block + Sync) {
        let (units, blocks) = (self.units, self.cols.div_ceil(QK4_0));
        let qs = &mut line_bytes_mut(&mut self.qs)[..self.rows * units * 64];
        qs.par_chunks_mut(units * 64)
            .zip(self.d.par_chunks_mut(units))
            .enumerate()
            .with_min_len(16)
            .for_each(|(r, (qs, ds))| {
                for u in 0..units {
                    // Padding blocks past the row's end: integers 8 (zero)
                    // and scale 0, so they contribute nothing either way.
                    let mut q = [8u8; UNIT];
                    for k in 0..BLOCKS_PER_UNIT {
                        let b = u * BLOCKS_PER_UNIT + k;
                        if b < blocks {
                            let blk = block(r, b);
                            q[k * QK4_0..(k + 1) * QK4_0].copy_from_slice(&blk.q);
                            ds[u][k] = blk.d;
                        }
                    }
                    // A range of exactly 64 bytes: the conversion cannot fail.
                    let out: &mut [u8; 64] = (&mut qs[u * 64..(u + 1) * 64])
                        .try_into()
                        .expect("64-byte unit");
                    pack_nibbles(&q, out);
                }
            });
    }

    /// Quantizes a row-major `[rows, cols]` matrix, rows in parallel. Any
    /// `cols` works: a last partial block is padded with zeros.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        super::check_dense(data.len(), rows, cols)?;
        let mut m = Self::zeroed(rows, cols);
        m.fill(|r, b| {
            let row = &data[r * cols..(r + 1) * cols];
            let x = &row[b * QK4_0..((b + 1) * QK4_0).min(cols)];
            if x.len() == QK4_0 {
                quantize_block(x)
            } else {
                let mut padded = [0f32; QK4_0];
                padded[..x.len()].copy_from_slice(x);
                quantize_block(&padded)
            }
        });
        Ok(m)
    }

    /// Adopts ggml's `block_q4_0` bytes of a `[rows, cols]` tensor (rows of
    /// `cols / 32` blocks, as GGUF stores them; `cols` is ggml's `ne[0]`).
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let blocks = check_ggml("Q4_0", bytes.len(), rows, cols, QK4_0, Q4_0_BLOCK_BYTES)?;
        let mut m = Self::zeroed(rows, cols);
        m.fill(|r, b| {
            let at = (r * blocks + b) * Q4_0_BLOCK_BYTES;
            parse_ggml(&bytes[at..at + Q4_0_BLOCK_BYTES])
        });
        Ok(m)
    }

    /// The matrix as ggml's `block_q4_0` bytes; `cols` must be a multiple
    /// of 32.
    pub fn to_ggml_bytes(&self) -> Result<Vec<u8>> {
        if !self.cols.is_multiple_of(QK4_0) {
            return Err(Error::Quant(format!(
                "a Q4_0 row of {} weights is not whole ggml blocks of {QK4_0}",
                self.cols
            )));
        }
        let blocks = self.cols / QK4_0;
        let mut out = vec![0u8; self.rows * blocks * Q4_0_BLOCK_BYTES];
        for r in 0..self.rows {
            for u in 0..self.units {
                let q = unpack_nibbles(self.unit_bytes(r, u));
                for k in 0..BLOCKS_PER_UNIT {
                    let b = u * BLOCKS_PER_UNIT + k;
                    if b < blocks {
                        // `q[k * QK4_0..(k + 1) * QK4_0]` is QK4_0 long: cannot fail.
                        let block = Block {
                            d: self.d[r * self.units + u][k],
                            q: q[k * QK4_0..(k + 1) * QK4_0].try_into().expect("a block"),
                        };
                        let at = (r * blocks + b) * Q4_0_BLOCK_BYTES;
                        write_ggml(&block, &mut out[at..at + Q4_0_BLOCK_BYTES]);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Bytes held: nibbles and scales, padding included.
    pub fn size_bytes(&self) -> usize {
        self.qs.len() * 64 + self.d.len() * BLOCKS_PER_UNIT * 2
    }

    /// Appends `other`'s rows after this matrix's (same width), room for
    /// `more` further rows being reserved once.
    pub(crate) fn append_rows(&mut self, other: Self, more: usize) -> Result<()> {
        super::check_append(self.cols, other.cols)?;
        super::extend_rows(&mut self.qs, &other.qs, self.units, more);
        super::extend_rows(&mut self.d, &other.d, self.units, more);
        self.rows += other.rows;
        Ok(())
    }

    fn unit_bytes(&self, r: usize, u: usize) -> &[u8; 64] {
        &self.qs[r * self.units + u].0
    }
}

/// Lane `l` takes the scale of block `l / 4` of its unit (of the second
/// unit of a pair, whose four scales follow the first's).
#[cfg(target_arch = "x86_64")]
const BLOCK_OF_LANE: [[i32; 16]; 2] = [
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
    [4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7],
];

impl UnitFormat for Q40Matrix {
    const ACTS: ActScale = ActScale::Block32;
    const OFFSET_OF_SCALE: Option<f32> = Some(8.0);

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
        self.units * (64 + 2 * BLOCKS_PER_UNIT)
    }

    fn unit_scalar(&self, r: usize, u: usize, out: &mut ScalarUnit) {
        let (lo, hi) = out.q.split_at_mut(64);
        for ((lo, hi), &b) in lo.iter_mut().zip(hi).zip(self.unit_bytes(r, u)) {
            *lo = b & 0x0F;
            *hi = b >> 4;
        }
        let d = self.d[r * self.units + u];
        for l in 0..16 {
            out.dl[l] = d[l / 4].to_f32();
            out.ol[l] = 8.0 * out.dl[l];
        }
    }

    fn weight(dl: f32, _ol: f32, q: u8) -> f32 {
        (q as i32 - 8) as f32 * dl
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn unit_avx512(&self, r: usize, u: usize) -> unit::x86::Unit512 {
        use std::arch::x86_64::*;
        let i = r * self.units + u;
        let (q0, q1) = unit::x86::nibbles512(line_bytes(&self.qs).as_ptr().add(i * 64));
        let d = unit::x86::f16x4(self.d.as_ptr().add(i).cast());
        unit::x86::Unit512 {
            q0,
            q1,
            dl: unit::x86::lanes512(_mm512_castps128_ps512(d), &BLOCK_OF_LANE[0]),
            ol: _mm512_setzero_ps(),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pair_avx512(&self, r: usize, p: usize) -> [unit::x86::Unit512; 2] {
        use std::arch::x86_64::*;
        let i = r * self.units + 2 * p;
        let at = line_bytes(&self.qs).as_ptr().add(i * 64);
        // Both units' eight scales in one conversion.
        let d = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(
            self.d.as_ptr().add(i).cast(),
        )));
        let unit = |h: usize| {
            let (q0, q1) = unit::x86::nibbles512(at.add(h * 64));
            unit::x86::Unit512 {
                q0,
                q1,
                dl: unit::x86::lanes512(d, &BLOCK_OF_LANE[h]),
                ol: _mm512_setzero_ps(),
            }
        };
        [unit(0), unit(1)]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn prefetch(&self, r: usize, u: usize) {
        use unit::x86::{prefetch, prefetch_nibbles};
        let at = prefetch_nibbles(self.qs.as_ptr(), self.units, r, u);
        // 8 bytes of scales per 64 of quants.
        prefetch(self.d.as_ptr(), at / 8);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unit_avx2(&self, r: usize, u: usize) -> unit::x86::Unit256 {
        use std::arch::x86_64::*;
        let i = r * self.units + u;
        let q = unit::x86::nibbles256(line_bytes(&self.qs).as_ptr().add(i * 64));
        let d = _mm256_castps128_ps256(unit::x86::f16x4(self.d.as_ptr().add(i).cast()));
        let lo = unit::x86::lanes256(d, &[0, 0, 0, 0, 1, 1, 1, 1]);
        let hi = unit::x86::lanes256(d, &[2, 2, 2, 2, 3, 3, 3, 3]);
        let eight = _mm256_set1_ps(8.0);
        unit::x86::Unit256 {
            q,
            dl: [lo, hi],
            ol: [_mm256_mul_ps(lo, eight), _mm256_mul_ps(hi, eight)],
        }
    }
}
