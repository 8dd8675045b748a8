//! Q8_0 matrix-vector products at Qwen2.5-0.5B's shapes against candle's
//! f32 matmul of the same shape: every kernel this CPU runs, one token
//! (decode) and 64 tokens (prefill) for the MLP's up projection. Then the
//! same shapes in Q6_K, Q4_K and Q4_0, with throughput in bytes of weights
//! (criterion's GB/s is what the product streams from memory or cache), and
//! a whole decode step's projections in Q8_0 and in `--quant q4_k` (Q4_K
//! projections, Q6_K head).
//!
//! `cargo bench --bench kernels`; set `RAYON_NUM_THREADS` to pin the thread
//! count (both taper's kernels and candle's matmul use rayon's global pool).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use taper::quant::{matmul_many, Kernel, Q8Matrix, QMatrix, Quant};

mod common;
use common::values;

fn bench_shape(c: &mut Criterion, cols: usize, rows: usize, tokens: usize) {
    let w = values(rows * cols, 1, 0.05);
    let x = values(tokens * cols, 2, 1.0);
    let q = Q8Matrix::quantize(&w, rows, cols).expect("quantize");
    let mut group = c.benchmark_group(format!("{cols}->{rows} t={tokens}"));
    // Throughput in weights: one weight is one multiply-add per token.
    group.throughput(Throughput::Elements((rows * cols * tokens) as u64));
    if rows * cols > 50_000_000 {
        group.sample_size(10);
    }
    for kernel in Kernel::available() {
        if kernel == Kernel::Scalar && rows * cols * tokens > 50_000_000 {
            continue; // seconds per sample, and it is only the fallback
        }
        group.bench_function(format!("q8_0 {}", kernel.name()), |b| {
            b.iter(|| q.matmul_with(kernel, &x, tokens).expect("matmul"))
        });
    }
    let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
    let xt = Tensor::from_vec(x, (tokens, cols), &Device::Cpu).expect("tensor");
    group.bench_function("candle f32", |b| {
        b.iter(|| xt.matmul(&wt.t().expect("t")).expect("matmul"))
    });
    group.finish();
}

/// Every projection of one Qwen2.5-0.5B decode step as the decoder runs
/// them: per layer q/k/v in one pass, o, gate/up in one pass, down; then the
/// head. 525 MB of Q8_0 weights, far more than any cache, so this measures
/// streaming from memory plus the pool's per-pass synchronisation. Like
/// `Decoder::forward`, the step runs on a pool thread.
fn decode_step(c: &mut Criterion) {
    let (h, inter, kv, vocab) = (896, 4864, 128, 151_936);
    let mut seed = 0;
    let mut mat = |rows: usize, cols: usize| {
        seed += 1;
        Q8Matrix::quantize(&values(rows * cols, seed, 0.05), rows, cols).expect("quantize")
    };
    // (q, k, v), o, (gate, up), down per layer.
    let layers: Vec<[Vec<Q8Matrix>; 4]> = (0..24)
        .map(|_| {
            [
                vec![mat(h, h), mat(kv, h), mat(kv, h)],
                vec![mat(h, h)],
                vec![mat(inter, h), mat(inter, h)],
                vec![mat(h, inter)],
            ]
        })
        .collect();
    let head = mat(vocab, h);
    let bytes: usize = layers
        .iter()
        .flatten()
        .flatten()
        .chain([&head])
        .map(Q8Matrix::size_bytes)
        .sum();
    let (xh, xi) = (values(h, 7, 1.0), values(inter, 8, 1.0));
    let kernel = Kernel::best();
    let mut group = c.benchmark_group("qwen2.5-0.5b decode step (projections)");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(20);
    group.bench_function(format!("q8_0 {}", kernel.name()), |b| {
        b.iter(|| {
            rayon::scope(|_| {
                for passes in &layers {
                    for mats in passes {
                        let x = if mats[0].cols() == h { &xh } else { &xi };
                        let refs: Vec<&Q8Matrix> = mats.iter().collect();
                        std::hint::black_box(matmul_many(kernel, &refs, x, 1).expect("matmul"));
                    }
                }
                std::hint::black_box(head.matmul(&xh, 1).expect("matmul"));
            })
        })
    });
    group.finish();
}

/// One format at one shape: every kernel this CPU runs, throughput in
/// bytes of weights read per product.
fn bench_format(c: &mut Criterion, quant: Quant, cols: usize, rows: usize, tokens: usize) {
    let w = values(rows * cols, 1, 0.05);
    let x = values(tokens * cols, 2, 1.0);
    let q = QMatrix::quantize(quant, &w, rows, cols).expect("quantize");
    let mut group = c.benchmark_group(format!("{quant} {cols}->{rows} t={tokens}"));
    group.throughput(Throughput::Bytes(q.size_bytes() as u64));
    if rows * cols > 50_000_000 {
        group.sample_size(10);
    }
    for kernel in Kernel::available() {
        if kernel == Kernel::Scalar && rows * cols * tokens > 50_000_000 {
            continue; // seconds per sample, and it is only the fallback
        }
        group.bench_function(kernel.name(), |b| {
            b.iter(|| q.matmul_with(kernel, &x, tokens).expect("matmul"))
        });
    }
    group.finish();
}

/// [`decode_step`] for `--quant q4_k`: Q4_K projections and a Q6_K head
/// (about 312 MB instead of Q8_0's 525), through `QMatrix::matmul_many` as
/// the decoder calls it.
fn decode_step_q4_k(c: &mut Criterion) {
    let (h, inter, kv, vocab) = (896, 4864, 128, 151_936);
    let mut seed = 0;
    let mut mat = |quant: Quant, rows: usize, cols: usize| {
        seed += 1;
        QMatrix::quantize(quant, &values(rows * cols, seed, 0.05), rows, cols).expect("quantize")
    };
    let q4 = Quant::Q4K;
    let layers: Vec<[Vec<QMatrix>; 4]> = (0..24)
        .map(|_| {
            [
                vec![mat(q4, h, h), mat(q4, kv, h), mat(q4, kv, h)],
                vec![mat(q4, h, h)],
                vec![mat(q4, inter, h), mat(q4, inter, h)],
                vec![mat(q4, h, inter)],
            ]
        })
        .collect();
    let head = mat(q4.for_head(), vocab, h);
    let bytes: usize = layers
        .iter()
        .flatten()
        .flatten()
        .chain([&head])
        .map(QMatrix::size_bytes)
        .sum();
    let (xh, xi) = (values(h, 7, 1.0), values(inter, 8, 1.0));
    let mut group = c.benchmark_group("qwen2.5-0.5b decode step (projections)");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.sample_size(20);
    group.bench_function(format!("q4_k+q6_k head {}", Kernel::best().name()), |b| {
        b.iter(|| {
            rayon::scope(|_| {
                for passes in &layers {
                    for mats in passes {
                        let x = if mats[0].cols() == h { &xh } else { &xi };
                        let refs: Vec<&QMatrix> = mats.iter().collect();
                        std::hint::black_box(QMatrix::matmul_many(&refs, x, 1).expect("matmul"));
                    }
                }
                std::hint::black_box(head.matmul(&xh, 1).expect("matmul"));
            })
        })
    });
    group.finish();
}

fn kernels(c: &mut Criterion) {
    bench_shape(c, 896, 4864, 1);
    bench_shape(c, 4864, 896, 1);
    bench_shape(c, 896, 151_936, 1);
    bench_shape(c, 896, 4864, 64);
}

fn formats(c: &mut Criterion) {
    for quant in [Quant::Q8_0, Quant::Q6K, Quant::Q4K, Quant::Q4_0] {
        bench_format(c, quant, 896, 4864, 1);
        bench_format(c, quant, 4864, 896, 1);
        bench_format(c, quant, 896, 151_936, 1);
        bench_format(c, quant, 896, 4864, 64);
        // Llama-3.2-1B's MLP: wider rows, one token and a prefill block.
        bench_format(c, quant, 2048, 8192, 1);
        bench_format(c, quant, 2048, 8192, 64);
    }
}

criterion_group!(benches, kernels, formats, decode_step, decode_step_q4_k);
criterion_main!(benches);
