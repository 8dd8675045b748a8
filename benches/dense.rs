//! Dense f32 and bf16 products (`taper::dense`) at Qwen2.5-0.5B's MLP
//! shape against candle's matmul of the same operands: every kernel this
//! CPU runs, for 1, 4, 16 and 64 tokens. The crossover where `gemm` beats
//! the tiled dot products for f32 sets `dense::F32_MAX_TOKENS`.
//!
//! `cargo bench --bench dense`; set `RAYON_NUM_THREADS` to pin the thread
//! count (taper's kernels and candle's matmul share rayon's global pool).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use taper::dense::{matmul, DenseKernel, Weights};

mod common;
use common::values;

fn bench_shape(c: &mut Criterion, cols: usize, rows: usize, tokens: usize) {
    let w = values(rows * cols, 1, 0.05);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let x = values(tokens * cols, 2, 1.0);
    let mut group = c.benchmark_group(format!("dense {cols}->{rows} t={tokens}"));
    // Throughput in weights: one weight is one multiply-add per token.
    group.throughput(Throughput::Elements((rows * cols * tokens) as u64));
    if rows * cols > 50_000_000 {
        group.sample_size(10);
    }
    for kernel in DenseKernel::available() {
        if kernel == DenseKernel::Scalar && (tokens > 4 || rows * cols > 50_000_000) {
            continue; // only the fallback, and slow
        }
        group.bench_function(format!("f32 {kernel:?}"), |b| {
            b.iter(|| matmul(kernel, Weights::F32(&w), rows, cols, &x, tokens).expect("matmul"))
        });
        group.bench_function(format!("bf16 {kernel:?}"), |b| {
            b.iter(|| matmul(kernel, Weights::Bf16(&wb), rows, cols, &x, tokens).expect("matmul"))
        });
    }
    let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
    let xt = Tensor::from_vec(x, (tokens, cols), &Device::Cpu).expect("tensor");
    group.bench_function("candle f32", |b| {
        b.iter(|| xt.matmul(&wt.t().expect("t")).expect("matmul"))
    });
    if tokens <= 4 {
        let wbt = wt.to_dtype(DType::BF16).expect("bf16");
        let xbt = xt.to_dtype(DType::BF16).expect("bf16");
        group.bench_function("candle bf16", |b| {
            b.iter(|| xbt.matmul(&wbt.t().expect("t")).expect("matmul"))
        });
    }
    group.finish();
}

fn products(c: &mut Criterion) {
    for tokens in [1, 4, 16, 64] {
        bench_shape(c, 896, 4864, tokens);
    }
    // Llama-3.2-1B's MLP, a prefill block.
    bench_shape(c, 2048, 8192, 64);
    // The tied head: 272 MB in bf16, far past the caches, so this one
    // measures streaming from memory.
    bench_shape(c, 896, 151_936, 1);
}

criterion_group!(benches, products);
criterion_main!(benches);
