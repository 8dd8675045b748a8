//! Same sequence, same logits: a token's logits are a function of the
//! sequence alone, bit for bit, however the engine happens to compute it.
//!
//! The reference is one pass over the whole sequence. Against it, in every
//! format taper runs (f32, bf16, the four `--quant` formats, GGUF files):
//! prefills cut into chunks of many sizes (the engine's
//! `--max-batched-tokens`, and decode steps), a cached prefix of 1, 2 and 5
//! blocks copied into a new cache (a prefix-cache hit) with the rest computed
//! after it, suffixes just under and over the old 16-token switch between
//! the attention paths, and the sequence inside batches of 2, 7 and 16
//! sequences of other lengths, some prefilling, some decoding. Recompute
//! after preemption is a prefill of the prompt and the tokens generated so
//! far, which the chunk cases cover; the engine's own tests check it end to
//! end (`engine::tests`).
//!
//! Equality is exact (`f32::to_bits`), not a tolerance: a greedy choice on a
//! real quantized model can sit within one ulp of a tie.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use taper::gguf::{self, GgufFile, GgufWeights};
use taper::kv_cache::SeqKvCache;
use taper::models::{Decoder, Logits, SeqInput};
use taper::quant::Quant;

use crate::common::{fixture, weight_files};

/// Positions in a KV-cache block (the engine's default; the prefix cache
/// shares whole blocks).
const BLOCK: usize = 16;

/// Every format taper runs, on fixtures that between them have grouped
/// queries, a sliding window and soft-capping (Gemma 2), mixture-of-experts
/// layers (tokens grouped by expert across the batch), and a Q5_0 GGUF
/// file (stored again as Q8_0 at load).
fn models() -> Vec<(String, Decoder)> {
    let safetensors = |name: &str, dtype: DType, quant: Quant| {
        let dir = fixture(name);
        let model = taper::models::load_quantized(
            &dir.join("config.json"),
            &weight_files(&dir),
            dtype,
            &Device::Cpu,
            quant,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        (format!("{name} {dtype:?} {quant:?}"), model)
    };
    let gguf = |file: &str| {
        let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf")
            .join(file);
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let config = gguf::model_config(&f).unwrap_or_else(|e| panic!("{file}: {e}"));
        let weights = GgufWeights::new(&f, &config);
        let model = Decoder::load(config, &weights, DType::F32, &Device::Cpu, Quant::None)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        (file.to_string(), model)
    };
    vec![
        safetensors("llama", DType::F32, Quant::None),
        safetensors("llama", DType::BF16, Quant::None),
        safetensors("llama", DType::F32, Quant::Q8_0),
        safetensors("llama", DType::F32, Quant::Q4K),
        safetensors("llama", DType::F32, Quant::Q6K),
        safetensors("llama", DType::F32, Quant::Q4_0),
        safetensors("gemma2", DType::F32, Quant::None),
        safetensors("gemma2", DType::BF16, Quant::Q4K),
        safetensors("qwen3_moe", DType::F32, Quant::None),
        safetensors("mixtral", DType::F32, Quant::Q8_0),
        gguf("llama3-q8_0.gguf"),
        gguf("qwen2-q5_0.gguf"),
    ]
}

/// A deterministic token sequence of `n` ids below `vocab`, different for
/// each `seed`.
fn sequence(seed: usize, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|t| ((t * 37 + seed * 101 + (t * t) % 13) % vocab) as u32)
        .collect()
}

/// Logits rows as raw bits.
fn rows(t: &candle_core::Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<f32>()
        .expect("f32 logits")
        .into_iter()
        .map(|r| r.into_iter().map(f32::to_bits).collect())
        .collect()
}

/// One pass of `tokens` on `cache`, every position's logits.
fn pass(model: &Decoder, tokens: &[u32], cache: &mut SeqKvCache) -> Vec<Vec<u32>> {
    let out = model
        .forward(&mut [SeqInput {
            tokens,
            cache,
            logits: Logits::All,
        }])
        .expect("forward");
    rows(&out[0])
}

/// Fails naming the first position and vocabulary entry that differ.
#[track_caller]
fn assert_same(what: &str, got: &[Vec<u32>], want: &[Vec<u32>]) {
    assert_eq!(got.len(), want.len(), "{what}: number of positions");
    for (pos, (g, w)) in got.iter().zip(want).enumerate() {
        if let Some(j) = (0..g.len()).find(|&j| g[j] != w[j]) {
            panic!(
                "{what}: position {pos}, token {j}: {} vs {} (one pass)",
                f32::from_bits(g[j]),
                f32::from_bits(w[j])
            );
        }
    }
}

#[test]
fn chunked_prefills_and_decode_steps_give_the_logits_of_one_pass() {
    for (name, model) in models() {
        let seq = sequence(1, 90, model.config().vocab_size);
        let whole = pass(&model, &seq, &mut model.new_cache());
        for chunk in [1, 2, 5, 15, 16, 17, 31, 64] {
            let mut cache = model.new_cache();
            let got: Vec<_> = seq
                .chunks(chunk)
                .flat_map(|c| pass(&model, c, &mut cache))
                .collect();
            assert_same(&format!("{name}, chunks of {chunk}"), &got, &whole);
        }
        // A prompt, then decode steps one token at a time.
        let mut cache = model.new_cache();
        let mut got = pass(&model, &seq[..40], &mut cache);
        for t in &seq[40..] {
            got.extend(pass(&model, std::slice::from_ref(t), &mut cache));
        }
        assert_same(&format!("{name}, decode steps"), &got, &whole);
    }
}

#[test]
fn a_cached_prefix_gives_the_logits_of_a_cold_prompt() {
    for (name, model) in models() {
        let vocab = model.config().vocab_size;
        let seq = sequence(2, 100, vocab);
        let whole = pass(&model, &seq, &mut model.new_cache());
        for blocks in [1, 2, 5] {
            let shared = blocks * BLOCK;
            // An earlier request shared the first `shared` tokens and went
            // on differently; its cache is what the prefix cache holds.
            let mut earlier: Vec<u32> = seq[..shared].to_vec();
            earlier.extend(sequence(9, 23, vocab));
            let mut held = model.new_cache();
            pass(&model, &earlier, &mut held);
            // Suffixes under, at and over 16 new tokens, and the rest.
            for suffix in [1, 15, 16, 17, seq.len() - shared] {
                let mut cache = held.copy_prefix(shared, shared + suffix).expect("copy");
                assert_eq!(cache.tokens(), &seq[..shared]);
                let got = pass(&model, &seq[shared..shared + suffix], &mut cache);
                assert_same(
                    &format!("{name}, {blocks} cached blocks then {suffix} tokens"),
                    &got,
                    &whole[shared..shared + suffix],
                );
            }
        }
    }
}

#[test]
fn a_sequence_in_a_batch_gets_the_logits_it_gets_alone() {
    for (name, model) in models() {
        let vocab = model.config().vocab_size;
        let seq = sequence(3, 70, vocab);
        let whole = pass(&model, &seq, &mut model.new_cache());
        for size in [2, 7, 16] {
            // The others: different lengths, half of them with a history
            // already cached (so they decode or continue a prompt while the
            // sequence under test prefills).
            let others: Vec<Vec<u32>> = (0..size - 1)
                .map(|i| sequence(10 + i, 1 + (i * 11) % 37, vocab))
                .collect();
            let mut caches: Vec<SeqKvCache> = (0..size - 1)
                .map(|i| {
                    let mut c = model.new_cache();
                    if i % 2 == 1 {
                        pass(&model, &sequence(40 + i, 5 + i, vocab), &mut c);
                    }
                    c
                })
                .collect();
            let mut cache = model.new_cache();
            let mut got = Vec::new();
            // The sequence in pieces of 33, 1, 17 and 19 tokens, each pass
            // with the others' next tokens (a whole prompt, then one token
            // at a time), the sequence at a different place each time.
            let mut at = 0;
            for (step, piece) in [33, 1, 17, 19].into_iter().enumerate() {
                let mine = &seq[at..at + piece];
                let feeds: Vec<Vec<u32>> = others
                    .iter()
                    .map(|o| {
                        if step == 0 {
                            o.clone()
                        } else {
                            vec![o[step % o.len()]]
                        }
                    })
                    .collect();
                let place = (step * 3) % size;
                let mut inputs: Vec<SeqInput> = feeds
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(tokens, cache)| SeqInput {
                        tokens,
                        cache,
                        logits: Logits::Last,
                    })
                    .collect();
                inputs.insert(
                    place,
                    SeqInput {
                        tokens: mine,
                        cache: &mut cache,
                        logits: Logits::All,
                    },
                );
                let out = model.forward(&mut inputs).expect("batched forward");
                got.extend(rows(&out[place]));
                at += piece;
            }
            assert_same(&format!("{name}, in a batch of {size}"), &got, &whole[..at]);
        }
    }
}
