//! The non-matmul parts of a decode step at Qwen2.5-0.5B's shapes: one
//! layer's attention for one new token over caches of several depths
//! (`cpu_attention::attend`, what `Decoder` runs per sequence and layer
//! for decode steps, and `models::layers::grouped_attention`, its general
//! path), and picking the next token from 151,936 logits
//! (`sampling::Sampler`) greedy and with the usual truncations.
//!
//! `cargo bench --bench decode`; set `RAYON_NUM_THREADS` to pin threads.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use taper::cpu_attention::{attend, Visibility};
use taper::models::layers::grouped_attention;
use taper::sampling::{Sampler, SamplingParams};

mod common;
use common::values;

/// 14 query heads over 2 KV heads of 64: 7 queries share each KV head.
fn attention(c: &mut Criterion) {
    let (kv, groups, hd) = (2, 7, 64);
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("attention decode step");
    for depth in [128, 1024, 4096] {
        let q =
            Tensor::from_vec(values(kv * groups * hd, 1, 1.0), (kv, groups, hd), &dev).expect("q");
        let k =
            Tensor::from_vec(values(kv * depth * hd, 2, 1.0), (kv, depth, hd), &dev).expect("k");
        let v =
            Tensor::from_vec(values(kv * depth * hd, 3, 1.0), (kv, depth, hd), &dev).expect("v");
        group.bench_function(format!("general kv_len={depth}"), |b| {
            b.iter(|| grouped_attention(&q, &k, &v, None, 0.125, None).expect("attention"))
        });
        // The decoder's path for decode steps: the same query as
        // `[1, heads, hd]` over the cache.
        let q1 = q.reshape((1, kv * groups, hd)).expect("q");
        let seen = Visibility {
            start_pos: depth - 1,
            window: None,
        };
        group.bench_function(format!("fused kv_len={depth}"), |b| {
            b.iter(|| attend(&q1, &k, &v, seen, 0.125, None).expect("attention"))
        });
    }
    group.finish();
}

fn sampling(c: &mut Criterion) {
    let vocab = 151_936;
    // Logits shaped like a model's: a few strong candidates over a long tail.
    let mut logits = values(vocab, 4, 4.0);
    for (i, l) in logits.iter_mut().enumerate().step_by(9973) {
        *l += 12.0 - (i % 7) as f32;
    }
    let history: Vec<u32> = (0..512).map(|i| (i * 297) % vocab as u32).collect();
    let cases = [
        (
            "greedy",
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
        ),
        (
            "temperature 0.8",
            SamplingParams {
                temperature: 0.8,
                ..Default::default()
            },
        ),
        (
            "top_k 40 + top_p 0.9",
            SamplingParams {
                temperature: 0.8,
                top_k: Some(40),
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "top_p 0.95",
            SamplingParams {
                temperature: 1.0,
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "min_p 0.05 + repetition 1.1 (512 seen)",
            SamplingParams {
                temperature: 0.7,
                min_p: 0.05,
                repetition_penalty: 1.1,
                ..Default::default()
            },
        ),
    ];
    let mut group = c.benchmark_group("sample 151936 logits");
    for (name, params) in cases {
        let mut sampler = Sampler::new(SamplingParams {
            seed: Some(7),
            ..params
        });
        sampler.observe_prompt(&history);
        group.bench_function(name, |b| {
            b.iter(|| sampler.sample(&logits).expect("sample"))
        });
    }
    group.finish();
}

criterion_group!(benches, attention, sampling);
criterion_main!(benches);
