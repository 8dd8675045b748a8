//! Parity with `transformers`: every fixture architecture's logits for the
//! prompt and for 32 greedy steps, alone and inside a batch of sequences of
//! other lengths, against references from `scripts/make_fixtures.py`.

use candle_core::{DType, Device, Tensor};
use taper::kv_cache::SeqKvCache;
use taper::models::{Decoder, Logits, SeqInput};

use crate::common::{argmax, fixture, max_abs_diff, weight_files, Reference, MODELS};

const TOL: f32 = 1e-4;

fn load(name: &str) -> Decoder {
    let dir = fixture(name);
    taper::models::load(
        &dir.join("config.json"),
        &weight_files(&dir),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn forward_one(model: &Decoder, tokens: &[u32], cache: &mut SeqKvCache, logits: Logits) -> Tensor {
    let mut batch = [SeqInput {
        tokens,
        cache,
        logits,
    }];
    model.forward(&mut batch).expect("forward").remove(0)
}

/// Prompt logits and 32 greedy steps for one sequence decoded alone.
fn check_alone(name: &str, model: &Decoder, r: &Reference, i: usize) {
    let mut cache = model.new_cache();
    let prompt = &r.prompts[i];
    let logits = forward_one(model, prompt, &mut cache, Logits::All);
    let d = max_abs_diff(&logits, r.prompt_logits(i));
    assert!(d < TOL, "{name} prompt {i}: prompt logits differ by {d}");

    let steps = r.greedy[i].len();
    let mut last = logits.get(prompt.len() - 1).expect("row");
    let mut tokens = Vec::with_capacity(steps);
    for step in 0..steps {
        let want = r.decode_logits(i).get(step).expect("row");
        let d = max_abs_diff(&last, &want);
        assert!(
            d < TOL,
            "{name} prompt {i} step {step}: logits differ by {d}"
        );
        let next = argmax(&last);
        tokens.push(next);
        last = forward_one(model, &[next], &mut cache, Logits::Last)
            .get(0)
            .expect("row");
    }
    assert_eq!(tokens, r.greedy[i], "{name} prompt {i}: greedy tokens");
}

#[test]
fn every_architecture_matches_transformers_alone() {
    for name in MODELS {
        let model = load(name);
        let r = Reference::load(name);
        for i in 0..r.prompts.len() {
            check_alone(name, &model, &r, i);
        }
    }
}

/// All prompts prefilled in one batch, then decoded together; the last
/// sequence joins late so that one pass mixes a prefill with decode steps.
#[test]
fn every_architecture_matches_transformers_in_a_batch() {
    for name in MODELS {
        let model = load(name);
        let r = Reference::load(name);
        let n = r.prompts.len();
        let steps = r.greedy[0].len();
        let mut caches: Vec<SeqKvCache> = (0..n).map(|_| model.new_cache()).collect();
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); n];
        // next[i]: the tokens sequence i feeds in the next pass.
        let mut next: Vec<Vec<u32>> = r.prompts.clone();
        let late = n - 1;
        for pass in 0..steps + 1 {
            let active: Vec<usize> = (0..n)
                .filter(|&i| (i != late || pass >= 1) && generated[i].len() < steps)
                .collect();
            if active.is_empty() {
                break;
            }
            let mut inputs: Vec<SeqInput> = Vec::new();
            let mut order = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                if active.contains(&i) {
                    inputs.push(SeqInput {
                        tokens: &next[i],
                        cache,
                        logits: Logits::Last,
                    });
                    order.push(i);
                }
            }
            let out = model.forward(&mut inputs).expect("batched forward");
            drop(inputs);
            for (row, &i) in out.iter().zip(&order) {
                let step = generated[i].len();
                let got = row.get(0).expect("row");
                let want = r.decode_logits(i).get(step).expect("row");
                let d = max_abs_diff(&got, &want);
                assert!(
                    d < TOL,
                    "{name} seq {i} step {step} in a batch: logits differ by {d}"
                );
                let t = argmax(&got);
                generated[i].push(t);
                next[i] = vec![t];
            }
        }
        for (i, (got, want)) in generated.iter().zip(&r.greedy).enumerate() {
            assert_eq!(got, want, "{name} seq {i} in a batch: greedy tokens");
        }
    }
}
