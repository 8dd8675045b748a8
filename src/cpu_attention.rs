//! Attention on the CPU, computed straight over a sequence's KV cache: for
//! decode steps and prefills alike.
//!
//! One pass per (token, KV head) reads each cached key and value once for
//! all the query heads that share it, with the causal mask and sliding
//! window as index bounds rather than an added `-inf` tensor. A query's
//! output is computed by the same instructions in the same order whatever
//! else is in the pass, so it depends on the sequence alone: a prefill in
//! one pass, in chunks, after a prefix-cache hit or beside other sequences
//! gives the same bits (issue 11; `tests/invariance.rs`). The general path
//! (`models::layers::grouped_attention`, candle's batched matmuls and a
//! mask) is left for other devices and dtypes; it sums in another order, and
//! prefills used to take it while decode steps came here, which made a
//! prefix-cache hit change the logits.
//!
//! For a decode step the general path's ops are each a few microseconds of
//! work behind their own allocation and dispatch, and its copy of V
//! (`contiguous` on a view of the cache) reads the whole history once more.
//! For a prefill it computes the scores of every masked position too; this
//! pass skips them (BENCHMARKS.md, "Same request, same tokens").
//!
//! Scores are computed and normalised in f32 as the general path does, in a
//! different summation order (differences of a few ulp).

use std::sync::OnceLock;

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// A 3-D f32 CPU tensor whose last dimension is contiguous, borrowed in
/// place: element `(a, b, c)` is `data[offset + a·s0 + b·s1 + c]`.
#[derive(Clone, Copy)]
struct View3<'a> {
    data: &'a [f32],
    offset: usize,
    dims: (usize, usize, usize),
    s0: usize,
    s1: usize,
}

impl View3<'_> {
    /// Row `(a, b)`: the `dims.2` values of the last dimension.
    #[inline]
    fn row(&self, a: usize, b: usize) -> &[f32] {
        let at = self.offset + a * self.s0 + b * self.s1;
        &self.data[at..at + self.dims.2]
    }
}

/// Runs `f` on `t` viewed in place when it is a 3-D f32 CPU tensor whose
/// last dimension is contiguous and all of whose elements lie in its
/// storage; `None` otherwise.
fn with_view3<R>(t: &Tensor, f: impl FnOnce(View3<'_>) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let dims = t.dims3().ok()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let data = cpu.as_slice::<f32>().ok()?;
    let stride = layout.stride();
    if stride.len() != 3 || (stride[2] != 1 && dims.2 > 1) {
        return None;
    }
    let view = View3 {
        data,
        offset: layout.start_offset(),
        dims,
        s0: stride[0],
        s1: stride[1],
    };
    // The last element must be inside the storage (every index is then
    // checked once more by slicing, but a bad layout is refused here).
    if dims.0 > 0 && dims.1 > 0 {
        let last = view.offset + (dims.0 - 1) * view.s0 + (dims.1 - 1) * view.s1 + dims.2;
        if last > data.len() {
            return None;
        }
    }
    Some(f(view))
}

/// Which keys each query sees.
#[derive(Debug, Clone, Copy)]
pub struct Visibility {
    /// Position of the first new query (the cache held this many before).
    pub start_pos: usize,
    /// Sliding-window layers see only the last `window` positions.
    pub window: Option<usize>,
}

impl Visibility {
    /// The keys query `i` sees: `j ≤ start_pos + i`, and `j + window >
    /// start_pos + i` on sliding layers (the general path's mask is built
    /// from this too).
    pub fn keys(&self, i: usize, kv_len: usize) -> std::ops::Range<usize> {
        let pos = self.start_pos + i;
        let hi = (pos + 1).min(kv_len);
        let lo = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        lo.min(hi)..hi
    }
}

/// Scaled dot-product attention of `q` (`[n, heads, head_dim]`) over the
/// cached `k` and `v` (`[kv_heads, kv_len, head_dim]`, views of the cache
/// are fine), query head `h` reading KV head `h / (heads / kv_heads)`.
/// Returns `[n, heads · head_dim]`, or `None` when the tensors are not f32
/// CPU tensors laid out as that reads them (the caller then takes the
/// general path).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seen: Visibility,
    scale: f32,
    softcap: Option<f32>,
) -> Result<Option<Tensor>> {
    let out = with_view3(q, |q| {
        with_view3(k, |k| {
            with_view3(v, |v| attend_views(q, k, v, seen, scale, softcap))
        })
    });
    out.flatten().flatten().transpose()
}

fn attend_views(
    q: View3<'_>,
    k: View3<'_>,
    v: View3<'_>,
    seen: Visibility,
    scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (n, heads, hd) = q.dims;
    let (kv_heads, kv_len, khd) = k.dims;
    if v.dims != k.dims || khd != hd || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::InvalidRequest(format!(
            "attention over q {:?}, k {:?}, v {:?}",
            q.dims, k.dims, v.dims
        )));
    }
    if seen.start_pos + n > kv_len {
        return Err(Error::InvalidRequest(format!(
            "{n} queries from position {} but {kv_len} cached positions",
            seen.start_pos
        )));
    }
    let groups = heads / kv_heads;
    let mut out = vec![0f32; n * heads * hd];
    if out.is_empty() {
        return Ok(Tensor::from_vec(out, (n, heads * hd), &Device::Cpu)?);
    }
    let simd = Simd::best();
    // Task `i · kv_heads + g` writes token `i`'s `groups` heads of KV head
    // `g`: a contiguous block of the `[n, heads, hd]` output.
    let task = |(t, block): (usize, &mut [f32])| {
        let (i, g) = (t / kv_heads, t % kv_heads);
        let keys = seen.keys(i, kv_len);
        let qs: Vec<&[f32]> = (0..groups).map(|h| q.row(i, g * groups + h)).collect();
        let kv = KvHead { k, v, g, keys };
        group(simd, &qs, &kv, scale, softcap, block);
    };
    // Below ~16 K multiply-adds a task costs more to hand out than to run.
    if n * kv_heads > 1 && n * kv_len * heads * hd >= 1 << 14 {
        out.par_chunks_mut(groups * hd).enumerate().for_each(task);
    } else {
        out.chunks_mut(groups * hd).enumerate().for_each(task);
    }
    Ok(Tensor::from_vec(out, (n, heads * hd), &Device::Cpu)?)
}

/// The keys and values one task reads: KV head `g`, positions `keys`.
struct KvHead<'a> {
    k: View3<'a>,
    v: View3<'a>,
    g: usize,
    keys: std::ops::Range<usize>,
}

/// One token's query heads `qs` (all reading the same KV head): writes
/// their outputs, one after the other, into `out`.
fn group(
    simd: Simd,
    qs: &[&[f32]],
    kv: &KvHead<'_>,
    scale: f32,
    softcap: Option<f32>,
    out: &mut [f32],
) {
    let len = kv.keys.len();
    out.fill(0.0);
    if len == 0 {
        // Nothing visible: the general path's softmax over all `-inf` gives
        // NaN; a zero output is what a masked-out row contributes.
        return;
    }
    // Scores, query-major: each key is read once for every query head.
    let mut scores = vec![0f32; qs.len() * len];
    simd.scores(qs, kv, scale, &mut scores);
    if let Some(cap) = softcap {
        for s in scores.iter_mut() {
            *s = (*s / cap).tanh() * cap;
        }
    }
    for row in scores.chunks_exact_mut(len) {
        crate::cpu_ops::softmax_slice(row);
    }
    simd.values(&scores, kv, out);
}

/// The instruction set the loops run with, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    /// AVX-512F intrinsics (for head sizes that are a multiple of 16).
    Avx512,
    /// The portable loops compiled with AVX2 and FMA.
    Avx2,
    Portable,
}

impl Simd {
    fn best() -> Simd {
        static BEST: OnceLock<Simd> = OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    return Simd::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Simd::Avx2;
                }
            }
            Simd::Portable
        })
    }

    /// `scores[h · len + jj] = scale · (qs[h] · k_j)` for the `jj`-th key.
    fn scores(self, qs: &[&[f32]], kv: &KvHead<'_>, scale: f32, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match self {
            // SAFETY: `best` returns `Avx512` only when the CPU has AVX-512F.
            Simd::Avx512 if kv.k.dims.2.is_multiple_of(16) => {
                return unsafe { x86::scores(qs, kv, scale, scores) }
            }
            // SAFETY: `best` returns these only when the CPU has the
            // features.
            Simd::Avx512 | Simd::Avx2 => return unsafe { x86::scores_avx2(qs, kv, scale, scores) },
            Simd::Portable => {}
        }
        scores_portable(qs, kv, scale, scores)
    }

    /// `out[h] = Σ_jj scores[h · len + jj] · v_j`, onto a zeroed `out`.
    fn values(self, scores: &[f32], kv: &KvHead<'_>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match self {
            // SAFETY: as in `scores`.
            Simd::Avx512 if kv.v.dims.2.is_multiple_of(16) => {
                return unsafe { x86::values(scores, kv, out) }
            }
            // SAFETY: as in `scores`.
            Simd::Avx512 | Simd::Avx2 => return unsafe { x86::values_avx2(scores, kv, out) },
            Simd::Portable => {}
        }
        values_portable(scores, kv, out)
    }
}

/// Lanes of the partial sums in [`dot`].
const LANES: usize = 16;

/// `Σ a·b` with sixteen partial sums (a single running sum would
/// serialise every add).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, ra) = a.as_chunks::<LANES>();
    let (cb, rb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn scores_portable(qs: &[&[f32]], kv: &KvHead<'_>, scale: f32, scores: &mut [f32]) {
    let len = kv.keys.len();
    for (jj, j) in kv.keys.clone().enumerate() {
        let kj = kv.k.row(kv.g, j);
        for (h, qh) in qs.iter().enumerate() {
            scores[h * len + jj] = dot(qh, kj) * scale;
        }
    }
}

#[inline(always)]
fn values_portable(scores: &[f32], kv: &KvHead<'_>, out: &mut [f32]) {
    let (len, hd) = (kv.keys.len(), kv.v.dims.2);
    for (jj, j) in kv.keys.clone().enumerate() {
        let vj = kv.v.row(kv.g, j);
        for (h, o) in out.chunks_exact_mut(hd).enumerate() {
            let p = scores[h * len + jj];
            for (o, &x) in o.iter_mut().zip(vj) {
                *o += p * x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::KvHead;

    /// [`super::scores_portable`] with AVX-512: a key's vectors are loaded
    /// once for all the query heads, each dot product is `hd / 16` FMAs and
    /// one reduction.
    ///
    /// # Safety
    /// AVX-512F must be available and the head size a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores(qs: &[&[f32]], kv: &KvHead<'_>, scale: f32, scores: &mut [f32]) {
        let (len, hd) = (kv.keys.len(), kv.k.dims.2);
        for (jj, j) in kv.keys.clone().enumerate() {
            let kj = kv.k.row(kv.g, j);
            for (h, qh) in qs.iter().enumerate() {
                let (qp, kp) = (qh.as_ptr(), kj.as_ptr());
                let mut acc = _mm512_setzero_ps();
                for c in (0..hd).step_by(16) {
                    // SAFETY: `c + 16 ≤ hd`, the length of both rows.
                    let (a, b) =
                        unsafe { (_mm512_loadu_ps(qp.add(c)), _mm512_loadu_ps(kp.add(c))) };
                    acc = _mm512_fmadd_ps(a, b, acc);
                }
                scores[h * len + jj] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
    }

    /// [`super::values_portable`] with AVX-512.
    ///
    /// # Safety
    /// AVX-512F must be available and the head size a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values(scores: &[f32], kv: &KvHead<'_>, out: &mut [f32]) {
        let (len, hd) = (kv.keys.len(), kv.v.dims.2);
        for (jj, j) in kv.keys.clone().enumerate() {
            let vp = kv.v.row(kv.g, j).as_ptr();
            for (h, o) in out.chunks_exact_mut(hd).enumerate() {
                let p = _mm512_set1_ps(scores[h * len + jj]);
                let op = o.as_mut_ptr();
                for c in (0..hd).step_by(16) {
                    // SAFETY: `c + 16 ≤ hd`, the length of `o` and of the row.
                    unsafe {
                        let acc = _mm512_fmadd_ps(
                            p,
                            _mm512_loadu_ps(vp.add(c)),
                            _mm512_loadu_ps(op.add(c)),
                        );
                        _mm512_storeu_ps(op.add(c), acc);
                    }
                }
            }
        }
    }

    /// The portable loops compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores_avx2(
        qs: &[&[f32]],
        kv: &KvHead<'_>,
        scale: f32,
        scores: &mut [f32],
    ) {
        super::scores_portable(qs, kv, scale, scores)
    }

    /// The portable loops compiled with AVX2 and FMA.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn values_avx2(scores: &[f32], kv: &KvHead<'_>, out: &mut [f32]) {
        super::values_portable(scores, kv, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers::grouped_attention;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// The general path on the same inputs: queries regrouped per KV head,
    /// an additive mask, then back to `[n, heads · hd]`.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seen: Visibility,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<Tensor> {
        let (n, heads, hd) = q.dims3()?;
        let (kv_heads, kv_len, _) = k.dims3()?;
        let groups = heads / kv_heads;
        let mut m = vec![0f32; n * kv_len];
        for i in 0..n {
            let keys = seen.keys(i, kv_len);
            for j in 0..kv_len {
                if !keys.contains(&j) {
                    m[i * kv_len + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(m, (n, kv_len), &Device::Cpu)?;
        let q_s = q
            .reshape((n, kv_heads, groups, hd))?
            .permute((1, 2, 0, 3))?
            .reshape((kv_heads, groups * n, hd))?;
        Ok(grouped_attention(
            &q_s,
            &k.contiguous()?,
            &v.contiguous()?,
            Some(&mask),
            scale,
            softcap,
        )?
        .reshape((kv_heads, groups, n, hd))?
        .permute((2, 0, 1, 3))?
        .reshape((n, heads * hd))?)
    }

    #[test]
    fn matches_the_general_path_on_cache_views() -> Result<()> {
        let dev = Device::Cpu;
        // (n, heads, kv_heads, head_dim, start_pos, window, softcap)
        let cases = [
            (1, 4, 2, 64, 0, None, None),
            (1, 14, 2, 64, 37, None, None),
            (3, 8, 8, 16, 20, None, None),
            (5, 6, 2, 40, 9, Some(6), None),
            (2, 4, 1, 256, 100, Some(32), Some(50.0)),
            (16, 32, 8, 64, 200, None, None),
            // Prefill-sized passes: from the start, and after a cached part.
            (100, 14, 2, 64, 0, None, None),
            (70, 4, 2, 32, 30, Some(6), Some(50.0)),
        ];
        for (case, &(n, heads, kv_heads, hd, start, window, softcap)) in cases.iter().enumerate() {
            let kv_len = start + n;
            let capacity = kv_len + 7; // the cache's spare room
            let q = Tensor::from_vec(values(n * heads * hd, case), (n, heads, hd), &dev)?;
            let kb = Tensor::from_vec(
                values(kv_heads * capacity * hd, case + 10),
                (kv_heads, capacity, hd),
                &dev,
            )?;
            let vb = Tensor::from_vec(
                values(kv_heads * capacity * hd, case + 20),
                (kv_heads, capacity, hd),
                &dev,
            )?;
            let (k, v) = (kb.narrow(1, 0, kv_len)?, vb.narrow(1, 0, kv_len)?);
            let seen = Visibility {
                start_pos: start,
                window,
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let got = attend(&q, &k, &v, seen, scale as f32, softcap.map(|c| c as f32))?
                .expect("f32 CPU views are taken");
            let want = reference(&q, &k, &v, seen, scale, softcap)?;
            let (got, want) = (got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
            for (gr, wr) in got.iter().zip(&want) {
                for (a, b) in gr.iter().zip(wr) {
                    assert!(
                        (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                        "case {case}: {a} vs {b}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn other_dtypes_and_bad_shapes_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((2, 3, 8), DType::F32, &dev)?;
        let seen = Visibility {
            start_pos: 2,
            window: None,
        };
        assert!(attend(&q.to_dtype(DType::BF16)?, &k, &k, seen, 1.0, None)?.is_none());
        // Three heads cannot share two KV heads.
        let q3 = Tensor::zeros((1, 3, 8), DType::F32, &dev)?;
        assert!(attend(&q3, &k, &k, seen, 1.0, None).is_err());
        // A query past the cache.
        let late = Visibility {
            start_pos: 3,
            window: None,
        };
        assert!(attend(&q, &k, &k, late, 1.0, None).is_err());
        Ok(())
    }
}
