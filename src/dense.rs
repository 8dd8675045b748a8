//! Dense matrix products on the CPU, for the weights `--quant` leaves dense:
//! f32, and bf16 with f32 accumulation.
//!
//! Why not candle's: candle 0.11's CPU matmul hands a one-token product to
//! `gemm`'s matrix-vector path, which runs on one thread (f32 decode used
//! one core of two), and it has no bf16 kernel at all: every bf16 product
//! widened both operands to fresh f32 buffers first (1.6 tokens/s decode
//! against 11 in f32). Here the rows of `W` are split across rayon's global
//! pool and each task computes tiles of up to 4 rows × 4 tokens of dot
//! products, reading each weight once per 4 tokens.
//!
//! Kernels are picked at run time for the CPU at hand: AVX-512 BF16
//! (`vdpbf16ps`, activations rounded to bf16 as llama.cpp does), AVX-512F,
//! AVX2 + FMA, or portable code; a binary built for baseline x86-64 still
//! gets the fast paths.

use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows and tokens of one tile: 4 × 4 accumulators plus 4 + 4 loaded
/// vectors stay within AVX-512's 32 registers.
const TILE: usize = 4;

/// One dense kernel; `best()` is the fastest this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseKernel {
    /// AVX-512 with the BF16 extension: bf16 × bf16 dot products into f32
    /// (bf16 weights only; f32 weights use [`DenseKernel::Avx512`]).
    Avx512Bf16,
    /// AVX-512 (F, BW, VL) fused multiply-add; bf16 weights widened in
    /// registers.
    Avx512,
    /// AVX2 + FMA.
    Avx2,
    /// Portable code.
    Scalar,
}

impl DenseKernel {
    /// The fastest kernel this CPU supports, detected once.
    pub fn best() -> DenseKernel {
        static BEST: OnceLock<DenseKernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            Self::available()
                .into_iter()
                .next()
                .unwrap_or(DenseKernel::Scalar)
        })
    }

    /// Every kernel this CPU supports, fastest first.
    pub fn available() -> Vec<DenseKernel> {
        [Self::Avx512Bf16, Self::Avx512, Self::Avx2, Self::Scalar]
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    pub fn is_available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => {
                Self::Avx512.is_available() && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// A row-major `[rows, cols]` weight matrix.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }
}

/// `x · Wᵀ`: `tokens` rows of `cols` values against `W` (`[rows, cols]`),
/// giving `tokens × rows` values.
pub fn matmul(
    kernel: DenseKernel,
    w: Weights<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
) -> Result<Vec<f32>> {
    if !kernel.is_available() {
        return Err(Error::Device(format!(
            "the {kernel:?} kernel needs CPU features this machine lacks"
        )));
    }
    if w.len() != rows * cols || x.len() != tokens * cols {
        return Err(Error::InvalidRequest(format!(
            "dense product: {} weights for [{rows}, {cols}], {} inputs for [{tokens}, {cols}]",
            w.len(),
            x.len()
        )));
    }
    // Not zeroed first: the tiles write every element once, and at a
    // prefill's sizes (10 MB for 512 tokens × 4,864 rows) zeroing and
    // faulting in fresh pages measured about 4% of the pass.
    let mut out: Vec<f32> = Vec::with_capacity(tokens * rows);
    let uninit = &mut out.spare_capacity_mut()[..tokens * rows];
    let shape = Shape { rows, cols, tokens };
    match (w, kernel) {
        (Weights::F32(w), DenseKernel::Scalar) => run(shape, w, x, uninit, scalar::tile_f32),
        (Weights::Bf16(w), DenseKernel::Scalar) => run(shape, w, x, uninit, scalar::tile_bf16),
        #[cfg(target_arch = "x86_64")]
        (Weights::F32(w), DenseKernel::Avx512 | DenseKernel::Avx512Bf16) => {
            run(shape, w, x, uninit, x86::tile_f32_avx512)
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::F32(w), DenseKernel::Avx2) => run(shape, w, x, uninit, x86::tile_f32_avx2),
        #[cfg(target_arch = "x86_64")]
        (Weights::Bf16(w), DenseKernel::Avx512Bf16) => {
            // Rounded to bf16 once per product, not once per tile.
            let xb = x86::to_bf16(x);
            run(shape, w, &xb, uninit, x86::tile_bf16_avx512bf16)
        }
        #[cfg(target_arch = "x86_64")]
        (Weights::Bf16(w), DenseKernel::Avx512) => run(shape, w, x, uninit, x86::tile_bf16_avx512),
        #[cfg(target_arch = "x86_64")]
        (Weights::Bf16(w), DenseKernel::Avx2) => run(shape, w, x, uninit, x86::tile_bf16_avx2),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the scalar kernel is available off x86-64"),
    }
    // SAFETY: `run` wrote all `tokens × rows` elements: its chunks cover
    // every row and each chunk's tiles every token.
    unsafe { out.set_len(tokens * rows) };
    Ok(out)
}

/// Whether [`matmul_tensor`] takes a product against a weight of `dtype` on
/// `device`, rather than candle: f32 and bf16 on the CPU, for any number
/// of tokens.
///
/// Every token's dot products here are summed in the same order whatever
/// tile it lands in, so a token's outputs do not depend on the other tokens
/// of the pass (a prefill chunk, a batch). `gemm`'s blocked products, which
/// f32 prefills used to take past 16 tokens, sum in another order than the
/// one-token products do, and a prefix-cache hit then changed the logits.
/// The cost, measured: see BENCHMARKS.md ("Same request, same tokens").
pub fn handles(dtype: DType, device: &Device) -> bool {
    device.is_cpu() && matches!(dtype, DType::BF16 | DType::F32)
}

/// `x · Wᵀ` for CPU tensors: `w` is `[out, in]` (f32 or bf16), `x` is
/// `[..., in]` in any float dtype; the result is `[..., out]` in f32.
pub fn matmul_tensor(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&cols) {
        return Err(Error::InvalidRequest(format!(
            "a projection of width {cols} got input of shape {dims:?}"
        )));
    }
    let tokens = x.elem_count() / cols.max(1);
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let w = w.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Err(Error::Device(
            "dense CPU kernels got a tensor on another device".into(),
        ));
    };
    let xd = &xs.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + x.elem_count()];
    let n = rows * cols;
    let wd = match w.dtype() {
        DType::F32 => {
            Weights::F32(&ws.as_slice::<f32>()?[wl.start_offset()..wl.start_offset() + n])
        }
        DType::BF16 => {
            Weights::Bf16(&ws.as_slice::<bf16>()?[wl.start_offset()..wl.start_offset() + n])
        }
        other => {
            return Err(Error::InvalidRequest(format!(
                "dense CPU kernels take f32 or bf16 weights, not {other:?}"
            )))
        }
    };
    let y = matmul(DenseKernel::best(), wd, rows, cols, xd, tokens)?;
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = rows;
    }
    Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
}

#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    cols: usize,
    tokens: usize,
}

/// Computes the dot products of `r` rows (from `w`, stride `cols`) with `t`
/// tokens (from `x`, stride `cols`) over `cols` values, writing
/// `out[ti * out_stride + ri]`. `r` and `t` are 1..=4.
type TileFn<W, X> = unsafe fn(
    w: *const W,
    x: *const X,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
    r: usize,
    t: usize,
);

/// The output pointer shared by the tasks of one product.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the columns of its own chunk of rows, and
// `run` returns only after every task has finished.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the whole (`Sync`) wrapper
    /// rather than the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Splits the rows into chunks across the pool; within a chunk, walks the
/// tokens in tiles of 4 and the rows in tiles of 4, so a chunk's weights
/// are read from memory once and then from cache for the other tokens.
fn run<W: Sync, X: Sync>(
    s: Shape,
    w: &[W],
    x: &[X],
    out: &mut [std::mem::MaybeUninit<f32>],
    tile: TileFn<W, X>,
) {
    let chunk = chunk_rows(s.rows, s.cols * std::mem::size_of::<W>(), s.tokens);
    let chunks = s.rows.div_ceil(chunk);
    let ptr = OutPtr(out.as_mut_ptr().cast::<f32>());
    // One token reuses nothing across rows, and one row at a time is one
    // sequential stream for the hardware prefetcher: on the 272 MB head,
    // 4-row tiles (4 interleaved streams) took 40–50 ms, single rows 13 ms.
    let row_tile = if s.tokens == 1 { 1 } else { TILE };
    let task = |c: usize| {
        let out = ptr.get();
        let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(s.rows));
        let mut t0 = 0;
        while t0 < s.tokens {
            let tn = (s.tokens - t0).min(TILE);
            let mut r = r0;
            while r < r1 {
                let rn = (r1 - r).min(row_tile);
                // SAFETY: rows r..r+rn and tokens t0..t0+tn are inside the
                // slices (checked by `matmul`), and the kernel was checked
                // to be available on this CPU.
                unsafe {
                    tile(
                        w.as_ptr().add(r * s.cols),
                        x.as_ptr().add(t0 * s.cols),
                        s.cols,
                        out.add(t0 * s.rows + r),
                        s.rows,
                        rn,
                        tn,
                    )
                }
                r += rn;
            }
            t0 += tn;
        }
    };
    if chunks <= 1 {
        task(0);
    } else {
        (0..chunks).into_par_iter().for_each(task);
    }
}

/// Rows per task: 8 tasks per thread to balance the pool, none under
/// 32 KiB of weights (scheduling cost), and none over 256 KiB when several
/// tokens re-read the chunk (it should stay in L2). Same reasoning and
/// figures as the Q8_0 kernels' chunking.
fn chunk_rows(rows: usize, row_bytes: usize, tokens: usize) -> usize {
    const MIN_BYTES: usize = 32 << 10;
    const MAX_BYTES_REUSED: usize = 256 << 10;
    let threads = rayon::current_num_threads().max(1);
    let mut n = rows.div_ceil(threads * 8);
    n = n.max(MIN_BYTES.div_ceil(row_bytes.max(1)));
    if tokens > 1 {
        n = n.min((MAX_BYTES_REUSED / row_bytes.max(1)).max(TILE));
    }
    // Whole tiles of rows, except for the last chunk.
    n = n.div_ceil(TILE) * TILE;
    n.clamp(1, rows.max(1))
}

/// Expands `$body` for the tile size `(r, t)` as const generics `R`, `T`.
macro_rules! dispatch_tile {
    ($r:expr, $t:expr, $f:ident($($arg:expr),*)) => {
        match ($r, $t) {
            (4, 4) => $f::<4, 4>($($arg),*),
            (4, 3) => $f::<4, 3>($($arg),*),
            (4, 2) => $f::<4, 2>($($arg),*),
            (4, 1) => $f::<4, 1>($($arg),*),
            (3, 4) => $f::<3, 4>($($arg),*),
            (3, 3) => $f::<3, 3>($($arg),*),
            (3, 2) => $f::<3, 2>($($arg),*),
            (3, 1) => $f::<3, 1>($($arg),*),
            (2, 4) => $f::<2, 4>($($arg),*),
            (2, 3) => $f::<2, 3>($($arg),*),
            (2, 2) => $f::<2, 2>($($arg),*),
            (2, 1) => $f::<2, 1>($($arg),*),
            (1, 4) => $f::<1, 4>($($arg),*),
            (1, 3) => $f::<1, 3>($($arg),*),
            (1, 2) => $f::<1, 2>($($arg),*),
            _ => $f::<1, 1>($($arg),*),
        }
    };
}

mod scalar {
    use super::bf16;

    /// Eight independent partial sums per dot product, so the compiler can
    /// vectorise with whatever the baseline target offers.
    #[inline(always)]
    unsafe fn tile<W: Copy, X: Copy, const R: usize, const T: usize>(
        w: *const W,
        x: *const X,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        wf: impl Fn(W) -> f32,
        xf: impl Fn(X) -> f32,
    ) {
        for r in 0..R {
            let wr = std::slice::from_raw_parts(w.add(r * cols), cols);
            for t in 0..T {
                let xt = std::slice::from_raw_parts(x.add(t * cols), cols);
                let mut acc = [0f32; 8];
                let mut wc = wr.chunks_exact(8);
                let mut xc = xt.chunks_exact(8);
                for (a, b) in (&mut wc).zip(&mut xc) {
                    for l in 0..8 {
                        acc[l] += wf(a[l]) * xf(b[l]);
                    }
                }
                let mut sum: f32 = acc.iter().sum();
                for (&a, &b) in wc.remainder().iter().zip(xc.remainder()) {
                    sum += wf(a) * xf(b);
                }
                *out.add(t * out_stride + r) = sum;
            }
        }
    }

    unsafe fn f32_rt<const R: usize, const T: usize>(
        w: *const f32,
        x: *const f32,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        tile::<f32, f32, R, T>(w, x, cols, out, out_stride, |v| v, |v| v)
    }

    unsafe fn bf16_rt<const R: usize, const T: usize>(
        w: *const bf16,
        x: *const f32,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        tile::<bf16, f32, R, T>(w, x, cols, out, out_stride, bf16::to_f32, |v| v)
    }

    pub(super) unsafe fn tile_f32(
        w: *const f32,
        x: *const f32,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        r: usize,
        t: usize,
    ) {
        dispatch_tile!(r, t, f32_rt(w, x, cols, out, out_stride))
    }

    pub(super) unsafe fn tile_bf16(
        w: *const bf16,
        x: *const f32,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        r: usize,
        t: usize,
    ) {
        dispatch_tile!(r, t, bf16_rt(w, x, cols, out, out_stride))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! One function per (instruction set, weight type). Each `*_rt` is
    //! compiled with its features enabled and fully unrolled for its tile
    //! size; the `tile_*` entry points pick the tile size.
    //!
    //! Columns past the last whole SIMD step are summed in scalar code.

    use std::arch::x86_64::*;

    use super::bf16;

    /// bf16 → f32 is a 16-bit shift into the high half of each lane.
    #[inline(always)]
    fn widen(v: bf16) -> f32 {
        f32::from_bits(u32::from(v.to_bits()) << 16)
    }

    /// How many leading lanes a row's first step leaves empty so that every
    /// later weight load is aligned to its size. Candle's buffers are only
    /// 16-byte aligned, and a 64-byte load that straddles two cache lines
    /// costs two; aligning the weight loads (the stream from memory) and
    /// masking the partial steps at both ends measured up to 2× on a
    /// 272 MB product. Rows whose size is not a multiple of the step do not
    /// share one alignment, and start at lane 0 (skew 0). With `pairs` (a
    /// lane multiplies two neighbouring elements) the skew must be even.
    ///
    /// Column `c` of a row always lands in lane `(c + skew) % lanes`, and
    /// each lane sums its columns in increasing order, so rotating the
    /// accumulators back by the skew ([`unskew`]) gives the sums a skew of 0
    /// gives, bit for bit: where the allocator put the weights (which
    /// differs from one run to the next) does not change the results.
    #[inline(always)]
    fn skew_of(w: usize, cols: usize, elem: usize, lanes: usize, pairs: bool) -> usize {
        let step = lanes * elem;
        let skew = (w % step) / elem;
        if !(cols * elem).is_multiple_of(step)
            || !w.is_multiple_of(elem)
            || (pairs && skew % 2 == 1)
        {
            0
        } else {
            skew
        }
    }

    /// The steps of one row: `(start, columns, first lane)` for a partial
    /// first step filling lanes `skew..`, then the aligned whole steps from
    /// lane 0, and a partial last one.
    #[inline(always)]
    fn steps(
        skew: usize,
        cols: usize,
        lanes: usize,
    ) -> impl Iterator<Item = (usize, usize, usize)> {
        let head = if skew > 0 {
            (lanes - skew).min(cols)
        } else {
            0
        };
        let first = (head > 0).then_some((0, head, skew));
        let body = (head..cols)
            .step_by(lanes)
            .map(move |i| (i, lanes.min(cols - i), 0));
        first.into_iter().chain(body)
    }

    /// The mask of `n` lanes from lane `first`.
    #[inline(always)]
    fn lanes_mask(n: usize, first: usize) -> u64 {
        ((1u64 << n) - 1) << first
    }

    /// Rotates each accumulator down by `rot` lanes, so that lane `l` holds
    /// what lane `l` holds with no skew (see [`skew_of`]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn unskew<const R: usize, const T: usize>(acc: &mut [[__m512; T]; R], rot: usize) {
        if rot == 0 {
            return;
        }
        let idx: [i32; 16] = std::array::from_fn(|l| ((l + rot) % 16) as i32);
        let idx = _mm512_loadu_si512(idx.as_ptr().cast());
        for a in acc.iter_mut().flatten() {
            *a = _mm512_permutexvar_ps(idx, *a);
        }
    }

    /// An AVX-512 f32 multiply-add tile whose weights are `$w`, loaded as
    /// 16 f32 lanes under mask `$m` from `$p` by `$load`.
    macro_rules! avx512_fma_rt {
        ($name:ident, $features:literal, $w:ty, |$p:ident, $m:ident| $load:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize, const T: usize>(
                w: *const $w,
                x: *const f32,
                cols: usize,
                out: *mut f32,
                os: usize,
            ) {
                let mut acc = [[_mm512_setzero_ps(); T]; R];
                let elem = std::mem::size_of::<$w>();
                let skew = skew_of(w as usize, cols, elem, 16, false);
                for (i, n, first) in steps(skew, cols, 16) {
                    let $m = lanes_mask(n, first) as __mmask16;
                    // A first step reads lanes `first..` from `first`
                    // elements before the row: masked lanes are not read.
                    let at = |row: usize| (row * cols + i).wrapping_sub(first);
                    let mut xv = [_mm512_setzero_ps(); T];
                    for (t, v) in xv.iter_mut().enumerate() {
                        *v = _mm512_maskz_loadu_ps($m, x.wrapping_add(at(t)));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let $p = w.wrapping_add(at(r));
                        let wv = $load;
                        for t in 0..T {
                            a[t] = _mm512_fmadd_ps(wv, xv[t], a[t]);
                        }
                    }
                }
                unskew(&mut acc, skew);
                store_sums::<R, T>(&acc, out, os);
            }
        };
    }
    avx512_fma_rt!(f32_avx512_rt, "avx512f,avx512bw,avx512vl", f32, |p, m| {
        _mm512_maskz_loadu_ps(m, p)
    });
    avx512_fma_rt!(bf16_avx512_rt, "avx512f,avx512bw,avx512vl", bf16, |p, m| {
        let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    });

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn bf16_avx512bf16_rt<const R: usize, const T: usize>(
        w: *const bf16,
        x: *const bf16,
        cols: usize,
        out: *mut f32,
        os: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        // Each f32 lane takes a pair of bf16 elements: an even skew keeps
        // the pairs, and the accumulators rotate by half of it.
        let skew = skew_of(w as usize, cols, 2, 32, true);
        for (i, n, first) in steps(skew, cols, 32) {
            let m = lanes_mask(n, first) as __mmask32;
            let at = |row: usize| (row * cols + i).wrapping_sub(first);
            let mut xv = [_mm512_setzero_si512(); T];
            for (t, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_epi16(m, x.wrapping_add(at(t)) as *const i16);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_epi16(m, w.wrapping_add(at(r)) as *const i16);
                for t in 0..T {
                    a[t] = _mm512_dpbf16_ps(
                        a[t],
                        std::mem::transmute::<__m512i, __m512bh>(wv),
                        std::mem::transmute::<__m512i, __m512bh>(xv[t]),
                    );
                }
            }
        }
        unskew(&mut acc, skew / 2);
        store_sums::<R, T>(&acc, out, os);
    }

    /// `x` rounded to bf16 (to nearest, ties to even, as `bf16::from_f32`;
    /// `vcvtneps2bf16` also flushes denormals, which no activation is),
    /// sixteen values per instruction.
    pub(super) fn to_bf16(x: &[f32]) -> Vec<bf16> {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        unsafe fn run(x: &[f32], out: &mut [bf16]) {
            let n = x.len() / 16 * 16;
            for i in (0..n).step_by(16) {
                let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
                _mm256_storeu_si256(
                    out.as_mut_ptr().add(i).cast(),
                    std::mem::transmute::<__m256bh, __m256i>(v),
                );
            }
            for i in n..x.len() {
                out[i] = bf16::from_f32(x[i]);
            }
        }
        let mut out = vec![bf16::ZERO; x.len()];
        // SAFETY: only called for the AVX-512 BF16 kernel, which `matmul`
        // checked this CPU has; the loop stays within both slices.
        unsafe { run(x, &mut out) };
        out
    }

    /// Writes the sum of each accumulator, `out[t · os + r]` for row `r`
    /// (at most four) and token `t`. A token's rows are reduced together
    /// and stored as one vector: three `vhaddps` for four sums, against four
    /// separate reductions of about nine instructions each (measured 16%
    /// faster bf16 products at 64 tokens, `benches/dense.rs`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl")]
    // Accumulators are indexed [row][token]; the loop runs over tokens.
    #[allow(clippy::needless_range_loop)]
    unsafe fn store_sums<const R: usize, const T: usize>(
        acc: &[[__m512; T]; R],
        out: *mut f32,
        os: usize,
    ) {
        // Four rows fill one vector of sums; the tiles have at most `TILE`.
        const { assert!(R <= 4) };
        let half = |v: __m512| {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            _mm256_add_ps(_mm512_castps512_ps256(v), hi)
        };
        for t in 0..T {
            let h: [__m256; 4] = std::array::from_fn(|r| {
                if r < R {
                    half(acc[r][t])
                } else {
                    _mm256_setzero_ps()
                }
            });
            let s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
            _mm_mask_storeu_ps(out.add(t * os), ((1u16 << R) - 1) as __mmask8, s);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// An AVX2 f32 multiply-add tile whose weights are `$w`, loaded as 8
    /// f32 lanes from `$p` by `$load`; columns past the last whole step are
    /// summed in scalar code (`$scalar` widens one weight).
    macro_rules! avx2_fma_rt {
        ($name:ident, $w:ty, |$p:ident| $load:expr, |$s:ident| $scalar:expr) => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name<const R: usize, const T: usize>(
                w: *const $w,
                x: *const f32,
                cols: usize,
                out: *mut f32,
                os: usize,
            ) {
                let mut acc = [[_mm256_setzero_ps(); T]; R];
                let steps = cols / 8;
                for i in 0..steps {
                    let mut xv = [_mm256_setzero_ps(); T];
                    for (t, v) in xv.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(x.add(t * cols + i * 8));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let $p = w.add(r * cols + i * 8);
                        let wv = $load;
                        for t in 0..T {
                            a[t] = _mm256_fmadd_ps(wv, xv[t], a[t]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    for t in 0..T {
                        let mut s = hsum256(a[t]);
                        for c in steps * 8..cols {
                            let $s = *w.add(r * cols + c);
                            s += $scalar * *x.add(t * cols + c);
                        }
                        *out.add(t * os + r) = s;
                    }
                }
            }
        };
    }
    avx2_fma_rt!(f32_avx2_rt, f32, |p| _mm256_loadu_ps(p), |v| v);
    avx2_fma_rt!(
        bf16_avx2_rt,
        bf16,
        |p| {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        },
        |v| widen(v)
    );

    /// The `tile_*` entry points, one per `*_rt`.
    macro_rules! entry {
        ($name:ident, $rt:ident, $features:literal, $w:ty, $x:ty) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                w: *const $w,
                x: *const $x,
                cols: usize,
                out: *mut f32,
                out_stride: usize,
                r: usize,
                t: usize,
            ) {
                dispatch_tile!(r, t, $rt(w, x, cols, out, out_stride))
            }
        };
    }
    entry!(
        tile_f32_avx512,
        f32_avx512_rt,
        "avx512f,avx512bw,avx512vl",
        f32,
        f32
    );
    entry!(
        tile_bf16_avx512,
        bf16_avx512_rt,
        "avx512f,avx512bw,avx512vl",
        bf16,
        f32
    );
    entry!(
        tile_bf16_avx512bf16,
        bf16_avx512bf16_rt,
        "avx512f,avx512bw,avx512vl,avx512bf16",
        bf16,
        bf16
    );
    entry!(tile_f32_avx2, f32_avx2_rt, "avx2,fma", f32, f32);
    entry!(tile_bf16_avx2, bf16_avx2_rt, "avx2,fma", bf16, f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-1, 1).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, tokens: usize) -> Vec<f64> {
        let mut out = vec![0f64; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                out[t * rows + r] = (0..cols)
                    .map(|c| f64::from(w[r * cols + c]) * f64::from(x[t * cols + c]))
                    .sum();
            }
        }
        out
    }

    /// Every available kernel, f32 and bf16 weights, odd shapes (partial
    /// tiles, columns that are not a whole SIMD step, chunks over several
    /// tasks) against an f64 reference on the same (bf16-rounded) weights.
    #[test]
    fn every_kernel_matches_the_f64_reference() -> Result<()> {
        for &(rows, cols, tokens) in &[
            (1, 7, 1),
            (5, 40, 3),
            (37, 96, 1),
            (130, 200, 6),
            (301, 896, 9),
        ] {
            let w = data(rows * cols, rows as u64);
            let x = data(tokens * cols, cols as u64);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            let want32 = reference(&w, &x, rows, cols, tokens);
            let want16 = reference(&wr, &x, rows, cols, tokens);
            for kernel in DenseKernel::available() {
                let got = matmul(kernel, Weights::F32(&w), rows, cols, &x, tokens)?;
                for (g, e) in got.iter().zip(&want32) {
                    assert!(
                        (f64::from(*g) - e).abs() < 1e-4 * (cols as f64).sqrt(),
                        "{kernel:?} f32 {rows}x{cols}x{tokens}: {g} vs {e}"
                    );
                }
                let got = matmul(kernel, Weights::Bf16(&wb), rows, cols, &x, tokens)?;
                // Avx512Bf16 rounds activations to bf16 too (8 bits of
                // mantissa): about 2^-9 relative per term.
                let tol = if kernel == DenseKernel::Avx512Bf16 {
                    1e-2
                } else {
                    1e-4
                } * (cols as f64).sqrt();
                for (g, e) in got.iter().zip(&want16) {
                    assert!(
                        (f64::from(*g) - e).abs() < tol,
                        "{kernel:?} bf16 {rows}x{cols}x{tokens}: {g} vs {e}"
                    );
                }
            }
        }
        Ok(())
    }

    /// The same weights placed at every alignment within a cache line, with
    /// rows a whole number of lines long, so the masked partial first and
    /// last steps run (and rows that are not, which take unaligned steps):
    /// each kernel gives the same products, bit for bit, wherever the
    /// allocator put the weights (it differs between runs; issue 11).
    #[test]
    fn every_alignment_gives_the_same_products() -> Result<()> {
        for (rows, tokens) in [(9, 2), (4, 1), (5, 4)] {
            for cols in [64, 96, 100] {
                let n = rows * cols;
                let vals = data(n, 7);
                let x = data(tokens * cols, 8);
                let bvals: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
                let wr: Vec<f32> = bvals.iter().map(|v| v.to_f32()).collect();
                let want32 = reference(&vals, &x, rows, cols, tokens);
                let want16 = reference(&wr, &x, rows, cols, tokens);
                for kernel in DenseKernel::available() {
                    let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
                    for off in 0..32 {
                        let mut buf = vec![0f32; n + 32];
                        buf[off..off + n].copy_from_slice(&vals);
                        let mut bbuf = vec![bf16::ZERO; n + 32];
                        bbuf[off..off + n].copy_from_slice(&bvals);
                        let (w, wb) = (&buf[off..off + n], &bbuf[off..off + n]);
                        let got32 = matmul(kernel, Weights::F32(w), rows, cols, &x, tokens)?;
                        for (g, e) in got32.iter().zip(&want32) {
                            assert!(
                                (f64::from(*g) - e).abs() < 1e-4,
                                "{kernel:?} f32 cols {cols} offset {off}: {g} vs {e}"
                            );
                        }
                        let got16 = matmul(kernel, Weights::Bf16(wb), rows, cols, &x, tokens)?;
                        let tol = if kernel == DenseKernel::Avx512Bf16 {
                            0.05
                        } else {
                            1e-4
                        };
                        for (g, e) in got16.iter().zip(&want16) {
                            assert!(
                                (f64::from(*g) - e).abs() < tol,
                                "{kernel:?} bf16 cols {cols} offset {off}: {g} vs {e}"
                            );
                        }
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        match &first {
                            None => first = Some((got32, got16)),
                            Some((f32s, f16s)) => {
                                assert_eq!(
                                    bits(&got32),
                                    bits(f32s),
                                    "{kernel:?} f32 {rows}x{cols} t{tokens}: offset {off} differs from 0"
                                );
                                assert_eq!(
                                    bits(&got16),
                                    bits(f16s),
                                    "{kernel:?} bf16 {rows}x{cols} t{tokens}: offset {off} differs from 0"
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_lengths_are_errors() {
        let w = vec![0f32; 12];
        assert!(matmul(DenseKernel::Scalar, Weights::F32(&w), 3, 5, &[0.0; 5], 1).is_err());
        assert!(matmul(DenseKernel::Scalar, Weights::F32(&w), 3, 4, &[0.0; 5], 1).is_err());
    }

    #[test]
    fn tensor_product_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (48, 96), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 96), &dev)?;
        let want = x.broadcast_matmul(&w.t()?)?;
        let got = matmul_tensor(&w, &x)?;
        assert_eq!(got.dims(), &[2, 3, 48]);
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-4, "{err}");
        let wb = w.to_dtype(DType::BF16)?;
        let got = matmul_tensor(&wb, &x)?;
        let want = x.broadcast_matmul(&wb.to_dtype(DType::F32)?.t()?)?;
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 0.02, "{err}");
        Ok(())
    }

    #[test]
    fn chunks_are_whole_tiles_and_cover_the_rows() {
        for &(rows, row_bytes, tokens) in &[
            (1, 4, 1),
            (4864, 3584, 1),
            (896, 19456, 64),
            (151936, 1792, 1),
            (5, 40, 3),
        ] {
            let n = chunk_rows(rows, row_bytes, tokens);
            assert!(n >= 1 && n <= rows);
            assert!(
                n.is_multiple_of(TILE) || n == rows,
                "{rows} rows -> chunks of {n}"
            );
        }
    }
}
