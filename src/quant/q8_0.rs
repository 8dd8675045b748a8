//! The Q8_0 format and the parallel matrix product over it.
//!
//! A weight row is cut into blocks of [`QK8_0`] = 32 values; each block keeps
//! one scale `d = max|x| / 127` (stored as f16, as llama.cpp's `block_q8_0`
//! does) and 32 integers `q = round(x / d)` in `-127..=127` (ties to even),
//! so `x ≈ q · d`.
//! Activations are quantized the same way when a product starts, with an
//! f32 scale, and the product is computed block by block in integers:
//! `y = Σ_blocks d_w · d_x · Σ_i q_w[i] · q_x[i]`.
//!
//! # Layout
//!
//! llama.cpp interleaves each block's scale with its quants (34 bytes a
//! block), so no SIMD load of the quants is aligned. Here the quants and the
//! scales are two arrays instead:
//!
//! - `quants`: row-major, each row padded to a whole number of 64-byte lines
//!   (an even number of blocks) and the array 64-byte aligned, so a 512-bit
//!   load is one aligned line holding two blocks. Each byte is stored in
//!   offset binary, `q + 128`: AVX-512 VNNI's `vpdpbusd` multiplies
//!   *unsigned* by signed bytes, and making the weights the unsigned operand
//!   turns the correction `-128 · Σ q_x` into a per-activation-block
//!   constant, computed once per token instead of once per weight row (see
//!   `kernels`). The AVX2 and scalar kernels flip the top bit back (`^ 0x80`).
//! - `scales`: f16, each row padded with zeros to a multiple of
//!   [`SCALE_GROUP`] = 16 blocks, so kernels load 16 scales at a time without
//!   a tail case. Padding costs at most 15 scales a row: 8 bytes, under 1%,
//!   for a 896-wide row.
//!
//! Rows whose length is not a multiple of 32 are padded with zero weights
//! (and the activations with zeros), so any shape quantizes and the product
//! is unchanged by the padding.
//!
//! # Parallelism
//!
//! A product is split into tasks of (a chunk of output rows) × (a block of up
//! to 64 tokens) on rayon's global pool (the pool candle's own CPU ops use);
//! products that share their input (a layer's q, k and v) run as one pass
//! ([`matmul_many`]), quantizing the input once and synchronising once.
//! Within a task, tokens go through the kernels four at a time, so each
//! weight row is loaded once for four tokens, and a chunk's rows are sized to
//! stay in L2 while the task's token tiles pass over them.

use std::mem::MaybeUninit;

use half::f16;
use rayon::prelude::*;

use super::kernels::{Kernel, Tile};
use crate::{Error, Result};

/// Weights (or activations) per block.
pub const QK8_0: usize = 32;
/// Bytes of one ggml `block_q8_0`: f16 `d`, then 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Scales are stored and loaded in groups of this many blocks.
pub(crate) const SCALE_GROUP: usize = 16;
/// Tokens a kernel call takes at once.
pub(crate) const TOKEN_TILE: usize = 4;
/// Tokens one task takes: a chunk's weights are re-read (from L2) once per
/// tile of these.
const TOKEN_BLOCK: usize = 64;
/// Rows a kernel call writes into its stack buffer.
const ROW_BATCH: usize = 64;

/// One cache line of quants; `Vec<Line>` is a 64-byte-aligned byte array.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub [u8; 64]);

pub(crate) fn lines(bytes: usize) -> Vec<Line> {
    vec![Line([0; 64]); bytes.div_ceil(64)]
}

pub(crate) fn line_bytes(v: &[Line]) -> &[u8] {
    // SAFETY: `Line` is 64 plain bytes with no padding (size 64, align 64).
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 64) }
}

pub(crate) fn line_bytes_mut(v: &mut [Line]) -> &mut [u8] {
    // SAFETY: as in `line_bytes`; the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 64) }
}

/// Row geometry shared by a weight matrix and the activations it multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Values per row.
    pub cols: usize,
    /// Blocks holding them (the last one zero-padded).
    pub blocks: usize,
    /// Bytes of quants per row: `blocks` rounded up to even, times 32.
    pub qstride: usize,
    /// Scales per row: `blocks` rounded up to [`SCALE_GROUP`].
    pub sstride: usize,
}

impl Geometry {
    fn new(cols: usize) -> Self {
        let blocks = cols.div_ceil(QK8_0);
        Geometry {
            cols,
            blocks,
            qstride: blocks.next_multiple_of(2) * QK8_0,
            sstride: blocks.next_multiple_of(SCALE_GROUP),
        }
    }
}

/// Quantizes one block of 32 values: its scale `d = max|x| / 127` and the
/// integers `q[i] = round(x[i] / d)`, computed with the unrounded `d` as
/// llama.cpp's `quantize_row_q8_0_ref` does. Rounding is to nearest, ties to
/// even (the x86 default that SIMD conversions use) rather than `roundf`'s
/// ties away from zero: the two differ only on exact halves.
///
/// Written without branches so it vectorizes; `|x / d| ≤ 127` lets the
/// magic-number trick round (adding 1.5 · 2²³ leaves no fraction bits).
#[inline(always)]
fn quantize_block(x: &[f32; QK8_0], q: &mut [i8; QK8_0]) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³
    let mut amax = 0f32;
    for &v in x {
        let a = v.abs();
        amax = if a > amax { a } else { amax };
    }
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (out, &v) in q.iter_mut().zip(x) {
        let r = (v * id + MAGIC) - MAGIC;
        *out = (r as i32).clamp(-127, 127) as i8;
    }
    d
}

/// Quantizes `x` (any length) block by block into `q` (`x.len()` rounded up
/// to 32 bytes; the tail of the last block is zero) and the block scales
/// into `d`, calling `each(block, scale, quants)` for every block so callers
/// can store them in their own layout.
#[inline(always)]
fn quantize_row(x: &[f32], mut each: impl FnMut(usize, f32, &[i8; QK8_0])) {
    let mut q = [0i8; QK8_0];
    let mut chunks = x.chunks_exact(QK8_0);
    let mut b = 0;
    for chunk in &mut chunks {
        let block: &[f32; QK8_0] = chunk.try_into().expect("chunks_exact yields whole blocks");
        let d = quantize_block(block, &mut q);
        each(b, d, &q);
        b += 1;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut block = [0f32; QK8_0];
        block[..rest.len()].copy_from_slice(rest);
        let d = quantize_block(&block, &mut q);
        each(b, d, &q);
    }
}

/// [`quantize_row`] compiled for the CPU at hand: the same source, which
/// LLVM vectorizes with 512- or 256-bit registers when allowed to.
fn quantize_row_dispatch(x: &[f32], each: impl FnMut(usize, f32, &[i8; QK8_0])) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn avx512(x: &[f32], each: impl FnMut(usize, f32, &[i8; QK8_0])) {
            quantize_row(x, each)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[f32], each: impl FnMut(usize, f32, &[i8; QK8_0])) {
            quantize_row(x, each)
        }
        match Kernel::best() {
            // SAFETY: `best` only returns kernels whose features this CPU has.
            Kernel::Avx512Vnni => return unsafe { avx512(x, each) },
            // SAFETY: as above.
            Kernel::Avx2 => return unsafe { avx2(x, each) },
            Kernel::Scalar => {}
        }
    }
    quantize_row(x, each)
}

/// A weight matrix `[rows, cols]` in Q8_0 (see the module docs for the
/// layout).
#[derive(Clone)]
pub struct Q8Matrix {
    rows: usize,
    geo: Geometry,
    quants: Vec<Line>,
    scales: Vec<f16>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix")
            .field("rows", &self.rows)
            .field("cols", &self.geo.cols)
            .finish()
    }
}

impl Q8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix, rows in parallel. Any
    /// `cols` works: a last partial block is padded with zeros.
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Result<Self> {
        super::check_dense(data.len(), rows, cols)?;
        let geo = Geometry::new(cols);
        let mut quants = lines(rows * geo.qstride);
        let mut scales = vec![f16::ZERO; rows * geo.sstride];
        line_bytes_mut(&mut quants)[..rows * geo.qstride]
            .par_chunks_mut(geo.qstride)
            .zip(scales.par_chunks_mut(geo.sstride))
            .zip(data.par_chunks(cols))
            .with_min_len(16)
            .for_each(|((q, d), x)| {
                quantize_row_dispatch(x, |b, scale, block| {
                    d[b] = f16::from_f32(scale);
                    for (dst, &v) in q[b * QK8_0..(b + 1) * QK8_0].iter_mut().zip(block) {
                        *dst = (v as u8) ^ 0x80;
                    }
                });
                // Padding blocks: weight 0 is 128 in offset binary.
                q[geo.blocks * QK8_0..].fill(0x80);
            });
        Ok(Q8Matrix {
            rows,
            geo,
            quants,
            scales,
        })
    }

    /// Adopts ggml's `block_q8_0` bytes of a `[rows, cols]` tensor (f16 `d`
    /// then 32 signed bytes per block; rows of `cols / 32` blocks, as GGUF
    /// stores them, `cols` being ggml's `ne[0]`), moving them into this
    /// layout: quants in offset binary, scales in their own array.
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        let blocks = super::check_ggml("Q8_0", bytes.len(), rows, cols, QK8_0, Q8_0_BLOCK_BYTES)?;
        let geo = Geometry::new(cols);
        let mut quants = lines(rows * geo.qstride);
        let mut scales = vec![f16::ZERO; rows * geo.sstride];
        line_bytes_mut(&mut quants)[..rows * geo.qstride]
            .par_chunks_mut(geo.qstride)
            .zip(scales.par_chunks_mut(geo.sstride))
            .zip(bytes.par_chunks(blocks * Q8_0_BLOCK_BYTES))
            .with_min_len(16)
            .for_each(|((q, d), src)| {
                for (b, block) in src.chunks_exact(Q8_0_BLOCK_BYTES).enumerate() {
                    d[b] = f16::from_le_bytes([block[0], block[1]]);
                    for (dst, &v) in q[b * QK8_0..(b + 1) * QK8_0].iter_mut().zip(&block[2..]) {
                        *dst = v ^ 0x80;
                    }
                }
                q[blocks * QK8_0..].fill(0x80);
            });
        Ok(Q8Matrix {
            rows,
            geo,
            quants,
            scales,
        })
    }

    /// The matrix as ggml's `block_q8_0` bytes; `cols` must be a multiple
    /// of 32.
    pub fn to_ggml_bytes(&self) -> Result<Vec<u8>> {
        if !self.geo.cols.is_multiple_of(QK8_0) {
            return Err(Error::Quant(format!(
                "a Q8_0 row of {} weights is not whole ggml blocks of {QK8_0}",
                self.geo.cols
            )));
        }
        let q = line_bytes(&self.quants);
        let mut out = Vec::with_capacity(self.rows * self.geo.blocks * Q8_0_BLOCK_BYTES);
        for r in 0..self.rows {
            for b in 0..self.geo.blocks {
                out.extend_from_slice(&self.scales[r * self.geo.sstride + b].to_le_bytes());
                let at = r * self.geo.qstride + b * QK8_0;
                out.extend(q[at..at + QK8_0].iter().map(|&v| v ^ 0x80));
            }
        }
        Ok(out)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.geo.cols
    }

    /// Bytes held: quants and scales, padding included.
    pub fn size_bytes(&self) -> usize {
        self.quants.len() * 64 + self.scales.len() * 2
    }

    /// Appends `other`'s rows after this matrix's (same width), room for
    /// `more` further rows being reserved once.
    pub(crate) fn append_rows(&mut self, other: Self, more: usize) -> Result<()> {
        super::check_append(self.geo.cols, other.geo.cols)?;
        super::extend_rows(&mut self.quants, &other.quants, self.geo.qstride / 64, more);
        super::extend_rows(&mut self.scales, &other.scales, self.geo.sstride, more);
        self.rows += other.rows;
        Ok(())
    }

    /// The integer of weight `(r, c)` and its block's scale.
    pub fn get(&self, r: usize, c: usize) -> (i8, f32) {
        let q = line_bytes(&self.quants)[r * self.geo.qstride + c] ^ 0x80;
        (
            q as i8,
            self.scales[r * self.geo.sstride + c / QK8_0].to_f32(),
        )
    }

    /// Back to dense f32 `[rows, cols]`: `q · d` per weight.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.geo.cols);
        for r in 0..self.rows {
            for c in 0..self.geo.cols {
                let (q, d) = self.get(r, c);
                out.push(q as f32 * d);
            }
        }
        out
    }

    /// `x · Wᵀ` for `x` row-major `[tokens, cols]`: `[tokens, rows]`, with
    /// the best kernel this CPU has.
    pub fn matmul(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        self.matmul_with(Kernel::best(), x, tokens)
    }

    /// [`Self::matmul`] with a chosen kernel (for tests and benchmarks).
    pub fn matmul_with(&self, kernel: Kernel, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let acts = Q8Activations::quantize(x, tokens, self.geo.cols)?;
        let mut out = vec![0f32; tokens * self.rows];
        self.matmul_quantized(kernel, &acts, &mut out)?;
        Ok(out)
    }

    /// The product with already-quantized activations into `out`
    /// (`[tokens, rows]`).
    pub fn matmul_quantized(
        &self,
        kernel: Kernel,
        acts: &Q8Activations,
        out: &mut [f32],
    ) -> Result<()> {
        // SAFETY: the same memory seen as possibly uninitialised; the pass
        // only writes f32 values into it.
        let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
        matmul_group(kernel, &[self], &[acts], &mut [out])
    }

    /// Rows `r0..r1` for tokens `t0..t0 + T`, written into `out`.
    fn tile<const T: usize>(
        &self,
        kernel: Kernel,
        acts: &Q8Activations,
        t0: usize,
        r0: usize,
        r1: usize,
        out: SyncPtr,
    ) {
        let g = self.geo;
        let wq = line_bytes(&self.quants);
        let x = std::array::from_fn::<_, T, _>(|k| acts.token(t0 + k));
        let mut buf = [0f32; ROW_BATCH * TOKEN_TILE];
        let mut r = r0;
        while r < r1 {
            let n = (r1 - r).min(ROW_BATCH);
            let tile = Tile {
                blocks: g.blocks,
                qstride: g.qstride,
                sstride: g.sstride,
                rows: n,
                wq: &wq[r * g.qstride..(r + n) * g.qstride],
                ws: &self.scales[r * g.sstride..(r + n) * g.sstride],
                xq: x.map(|a| a.0),
                xd: x.map(|a| a.1),
                xs: x.map(|a| a.2),
            };
            kernel.run(&tile, &mut buf[..n * T]);
            for i in 0..n {
                for k in 0..T {
                    // SAFETY: `(t0 + k, r + i)` is inside the `[tokens, rows]`
                    // output, and tasks own disjoint (row chunk, token block)
                    // rectangles of it, so no two threads write one element.
                    unsafe { *out.0.add((t0 + k) * self.rows + r + i) = buf[i * T + k] };
                }
            }
            r += n;
        }
    }
}

/// Products of several matrices of the same width with the same
/// activations (a layer's q, k and v; gate and up), as one parallel pass:
/// the activations are quantized once and the pool synchronises once.
/// Returns one `[tokens, rows]` output per matrix.
pub fn matmul_many(
    kernel: Kernel,
    mats: &[&Q8Matrix],
    x: &[f32],
    tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let Some(first) = mats.first() else {
        return Ok(Vec::new());
    };
    let acts = Q8Activations::quantize(x, tokens, first.geo.cols)?;
    let each = vec![&acts; mats.len()];
    written_outputs(mats.iter().map(|m| tokens * m.rows), |views| {
        matmul_group(kernel, mats, &each, views)
    })
}

/// Products of several matrices, each with its own input (a
/// mixture-of-experts layer's experts over the tokens routed to each), as
/// one parallel pass. Matrix `i` reads `inputs[which[i]]` (`[tokens,
/// cols]`), quantized once however many matrices read it; returns one
/// `[tokens, rows]` output per matrix.
pub fn matmul_grouped(
    kernel: Kernel,
    mats: &[&Q8Matrix],
    which: &[usize],
    inputs: &[(&[f32], usize)],
) -> Result<Vec<Vec<f32>>> {
    let mut acts: Vec<Option<Q8Activations>> = (0..inputs.len()).map(|_| None).collect();
    for (m, &j) in mats.iter().zip(which) {
        let slot = acts
            .get_mut(j)
            .ok_or_else(|| Error::InvalidRequest(format!("no input {j} for a grouped product")))?;
        if slot.is_none() {
            let (x, tokens) = inputs[j];
            *slot = Some(Q8Activations::quantize(x, tokens, m.geo.cols)?);
        }
    }
    let refs: Vec<&Q8Activations> = which.iter().filter_map(|&j| acts[j].as_ref()).collect();
    written_outputs(
        mats.iter().zip(&refs).map(|(m, a)| a.tokens * m.rows),
        |views| matmul_group(kernel, mats, &refs, views),
    )
}

/// Output buffers of `lens` values for a pass that writes every element
/// (`run`), not zeroed first: at a prefill's sizes, zeroing and faulting in
/// fresh pages measured a few percent of the pass.
pub(crate) fn written_outputs(
    lens: impl Iterator<Item = usize>,
    run: impl FnOnce(&mut [&mut [MaybeUninit<f32>]]) -> Result<()>,
) -> Result<Vec<Vec<f32>>> {
    let lens: Vec<usize> = lens.collect();
    let mut outs: Vec<Vec<f32>> = lens.iter().map(|&n| Vec::with_capacity(n)).collect();
    let mut views: Vec<&mut [MaybeUninit<f32>]> = outs
        .iter_mut()
        .zip(&lens)
        .map(|(o, &n)| &mut o.spare_capacity_mut()[..n])
        .collect();
    run(&mut views)?;
    drop(views);
    for (o, &n) in outs.iter_mut().zip(&lens) {
        // SAFETY: `run` returned Ok, so it wrote all `n` values of each.
        unsafe { o.set_len(n) };
    }
    Ok(outs)
}

/// The parallel pass behind every product: tasks of (matrix, chunk of rows,
/// block of tokens), each writing its own rectangle of its matrix's output.
fn matmul_group(
    kernel: Kernel,
    mats: &[&Q8Matrix],
    acts: &[&Q8Activations],
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
        if acts.geo != m.geo || out.len() != tokens * m.rows {
            return Err(Error::InvalidRequest(format!(
                "Q8_0 product: weights [{}, {}], activations [{}, {}], output of {} values",
                m.rows,
                m.geo.cols,
                tokens,
                acts.geo.cols,
                out.len()
            )));
        }
        let chunk = chunk_rows(m.rows, m.geo.qstride, tokens);
        let chunks = m.rows.div_ceil(chunk);
        plan.push((
            chunk,
            chunks,
            tasks,
            SyncPtr(out.as_mut_ptr().cast::<f32>()),
        ));
        tasks += chunks * token_blocks;
    }
    let task = |i: usize| {
        // The matrix whose tasks include `i`: the last one starting at or before it.
        let mi = plan.partition_point(|p| p.2 <= i) - 1;
        let (chunk, chunks, first, out) = plan[mi];
        let (m, acts) = (mats[mi], acts[mi]);
        let local = i - first;
        let (rc, tb) = (local % chunks, local / chunks);
        let r0 = rc * chunk;
        let r1 = (r0 + chunk).min(m.rows);
        let t1 = ((tb + 1) * TOKEN_BLOCK).min(acts.tokens);
        let mut t0 = tb * TOKEN_BLOCK;
        while t0 < t1 {
            let n = (t1 - t0).min(TOKEN_TILE);
            match n {
                4 => m.tile::<4>(kernel, acts, t0, r0, r1, out),
                3 => m.tile::<3>(kernel, acts, t0, r0, r1, out),
                2 => m.tile::<2>(kernel, acts, t0, r0, r1, out),
                _ => m.tile::<1>(kernel, acts, t0, r0, r1, out),
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

/// The output pointer shared by the tasks of one product.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint elements (see `Q8Matrix::tile`), and the
// product waits for every task before the buffer is used again.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

/// Rows per task: enough tasks to balance the pool (8 per thread), none
/// smaller than 32 KiB of weights (so scheduling is amortised), and, when
/// several tokens re-read the chunk, none over 256 KiB (so it stays in L2).
/// On the decode-step benchmark (2 threads) 8 tasks a thread beat 2, 4, 16
/// and 32, and a 128 KiB floor changed nothing.
pub(crate) fn chunk_rows(rows: usize, row_bytes: usize, tokens: usize) -> usize {
    const MIN_BYTES: usize = 32 << 10;
    const MAX_BYTES_REUSED: usize = 256 << 10;
    let threads = rayon::current_num_threads().max(1);
    let mut n = rows.div_ceil(threads * 8);
    n = n.max(MIN_BYTES.div_ceil(row_bytes));
    if tokens > 1 {
        n = n.min((MAX_BYTES_REUSED / row_bytes).max(1));
    }
    n.clamp(1, rows)
}

/// Activations `[tokens, cols]` quantized to blocks of 32 with f32 scales,
/// laid out like a [`Q8Matrix`] of the same width (signed bytes, not offset).
pub struct Q8Activations {
    tokens: usize,
    geo: Geometry,
    quants: Vec<Line>,
    /// `tokens × sstride` scales, zero past the last block.
    scales: Vec<f32>,
    /// `Σ q` of each block (exact in f32: |Σ q| ≤ 32 · 127), for the VNNI
    /// kernel's offset correction.
    sums: Vec<f32>,
}

impl Q8Activations {
    /// Quantizes row-major `[tokens, cols]` values, tokens in parallel when
    /// there are many.
    pub fn quantize(x: &[f32], tokens: usize, cols: usize) -> Result<Self> {
        if tokens == 0 || cols == 0 || x.len() != tokens * cols {
            return Err(Error::InvalidRequest(format!(
                "cannot quantize {} activations as [{tokens}, {cols}]",
                x.len()
            )));
        }
        let geo = Geometry::new(cols);
        let mut quants = lines(tokens * geo.qstride);
        let mut scales = vec![0f32; tokens * geo.sstride];
        let mut sums = vec![0f32; tokens * geo.sstride];
        // One token: (quants, scales), (block sums, values).
        type Row<'a> = ((&'a mut [u8], &'a mut [f32]), (&'a mut [f32], &'a [f32]));
        let one = |((q, d), (s, x)): Row<'_>| {
            quantize_row_dispatch(x, |b, scale, block| {
                d[b] = scale;
                s[b] = block.iter().map(|&v| v as i32).sum::<i32>() as f32;
                for (dst, &v) in q[b * QK8_0..(b + 1) * QK8_0].iter_mut().zip(block) {
                    *dst = v as u8;
                }
            });
        };
        let q = &mut line_bytes_mut(&mut quants)[..tokens * geo.qstride];
        if tokens >= 16 {
            q.par_chunks_mut(geo.qstride)
                .zip(scales.par_chunks_mut(geo.sstride))
                .zip(sums.par_chunks_mut(geo.sstride).zip(x.par_chunks(cols)))
                .for_each(one);
        } else {
            q.chunks_mut(geo.qstride)
                .zip(scales.chunks_mut(geo.sstride))
                .zip(sums.chunks_mut(geo.sstride).zip(x.chunks(cols)))
                .for_each(one);
        }
        Ok(Q8Activations {
            tokens,
            geo,
            quants,
            scales,
            sums,
        })
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Back to dense f32 `[tokens, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let q = line_bytes(&self.quants);
        let mut out = Vec::with_capacity(self.tokens * self.geo.cols);
        for t in 0..self.tokens {
            for c in 0..self.geo.cols {
                let v = q[t * self.geo.qstride + c] as i8;
                out.push(v as f32 * self.scales[t * self.geo.sstride + c / QK8_0]);
            }
        }
        out
    }

    /// One token's quants, scales and block sums.
    fn token(&self, t: usize) -> (&[u8], &[f32], &[f32]) {
        let g = self.geo;
        (
            &line_bytes(&self.quants)[t * g.qstride..(t + 1) * g.qstride],
            &self.scales[t * g.sstride..(t + 1) * g.sstride],
            &self.sums[t * g.sstride..(t + 1) * g.sstride],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in `[-1, 1)` with a per-row scale, an outlier
    /// now and then, and an all-zero block, so blocks differ in range.
    fn data(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut v = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let scale = 0.01 * (1 + r % 7) as f32;
            for c in 0..cols {
                let x = next() * scale;
                v.push(if c % 97 == 5 {
                    x * 20.0
                } else if r % 5 == 1 && c < 32 {
                    0.0
                } else {
                    x
                });
            }
        }
        v
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() -> Result<()> {
        for (rows, cols) in [(3, 64), (5, 45), (4, 1000)] {
            let x = data(rows, cols, 1);
            let m = Q8Matrix::quantize(&x, rows, cols)?;
            let y = m.dequantize();
            assert_eq!(y.len(), x.len());
            for r in 0..rows {
                for (b, block) in x[r * cols..(r + 1) * cols].chunks(QK8_0).enumerate() {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    // Rounding q costs d/2; storing d as f16 (11-bit
                    // significand) moves q·d by at most 127 · d · 2⁻¹¹.
                    let bound = d * (0.5 + 127.0 / 2048.0) + 1e-7;
                    for (i, &v) in block.iter().enumerate() {
                        let c = b * QK8_0 + i;
                        let (q, _) = m.get(r, c);
                        assert!((-127..=127).contains(&q));
                        let err = (v - y[r * cols + c]).abs();
                        assert!(
                            err <= bound,
                            "[{r},{c}]: {v} came back as {} (bound {bound})",
                            y[r * cols + c]
                        );
                        if v.abs() == amax && amax > 0.0 {
                            assert_eq!(q.unsigned_abs(), 127, "the largest value maps to ±127");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bytes_per_weight_at_real_widths() -> Result<()> {
        // Qwen2.5-0.5B's projections: 8 bits a weight plus an f16 scale per
        // 32 (1.0625 bytes), plus the scale-row padding.
        for (rows, cols) in [(8, 896), (8, 4864)] {
            let m = Q8Matrix::quantize(&vec![0.5; rows * cols], rows, cols)?;
            let per_weight = m.size_bytes() as f64 / (rows * cols) as f64;
            assert!(
                (1.0625..1.075).contains(&per_weight),
                "{cols}: {per_weight}"
            );
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q8Matrix::quantize(&[1.0; 10], 3, 4).is_err());
        assert!(Q8Matrix::quantize(&[], 0, 4).is_err());
        let m = Q8Matrix::quantize(&[1.0; 64], 2, 32).unwrap();
        assert!(m.matmul(&[1.0; 33], 1).is_err());
    }

    /// `x · Wᵀ` in f64 from dense `x` and `w`.
    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, t: usize) -> Vec<f64> {
        let mut out = vec![0f64; t * rows];
        for k in 0..t {
            for r in 0..rows {
                out[k * rows + r] = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[k * cols + c] as f64)
                    .sum();
            }
        }
        out
    }

    /// Each kernel against dequantize-then-matmul in f64, on shapes with
    /// partial blocks, an odd number of blocks, more than one scale group,
    /// row counts that divide into no chunk or row batch, one token and a
    /// token count that is not a multiple of the tile.
    #[test]
    fn every_kernel_matches_the_f64_reference() -> Result<()> {
        let shapes = [
            (37, 96, 1),
            (37, 96, 7),
            (131, 80, 7),
            (200, 544, 1),
            (1000, 1056, 7),
            (67, 4864, 5),
        ];
        let kernels = Kernel::available();
        assert!(kernels.contains(&Kernel::Scalar));
        for (rows, cols, t) in shapes {
            let w = data(rows, cols, rows as u64);
            let x = data(t, cols, 99);
            let m = Q8Matrix::quantize(&w, rows, cols)?;
            let acts = Q8Activations::quantize(&x, t, cols)?;
            let wd = m.dequantize();
            let xd = acts.dequantize();
            // Against the quantized operands the integer products are exact:
            // only f32 rounding of the scaled sums remains.
            let exact = reference(&wd, &xd, rows, cols, t);
            // Against the dense activations, quantizing x costs at most
            // Σ |w| · d_x / 2 per block.
            let dense = reference(&wd, &x, rows, cols, t);
            for &kernel in &kernels {
                let y = m.matmul_with(kernel, &x, t)?;
                assert_eq!(y.len(), t * rows);
                for k in 0..t {
                    for r in 0..rows {
                        let i = k * rows + r;
                        let mut magnitude = 0f64;
                        let mut act_bound = 0f64;
                        for c in 0..cols {
                            let wv = wd[r * cols + c] as f64;
                            magnitude += (wv * xd[k * cols + c] as f64).abs();
                            let amax = x[k * cols + (c / QK8_0) * QK8_0..]
                                .iter()
                                .take(QK8_0.min(cols - (c / QK8_0) * QK8_0))
                                .fold(0f32, |m, v| m.max(v.abs()));
                            act_bound += wv.abs() * amax as f64 / 127.0 / 2.0;
                        }
                        let got = y[i] as f64;
                        let tol = 1e-5 * magnitude + 1e-6;
                        assert!(
                            (got - exact[i]).abs() <= tol,
                            "{kernel:?} [{rows}x{cols}] t={t} ({k},{r}): {got} vs {} (tol {tol})",
                            exact[i]
                        );
                        assert!(
                            (got - dense[i]).abs() <= act_bound * 1.001 + tol,
                            "{kernel:?} [{rows}x{cols}] t={t} ({k},{r}): {got} vs dense {}",
                            dense[i]
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn chunks_balance_and_respect_the_cache_bounds() {
        // One token: at least 32 KiB a task.
        let n = chunk_rows(896, 896, 1);
        assert!(n * 896 >= 32 << 10 || n == 896);
        // Many tokens over a wide matrix: a chunk stays within 256 KiB.
        let n = chunk_rows(151_936, 896, 7);
        assert!(n * 896 <= 256 << 10);
        assert_eq!(chunk_rows(3, 64, 1), 3);
    }
}
