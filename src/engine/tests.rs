//! The engine's invariants on the Qwen2 fixture: a sequence batched,
//! chunked, served from the prefix cache or preempted gives exactly what it
//! gives alone.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device};

use super::*;
use crate::constraint::ConstraintSpec;
use crate::hub::{resolve, HubOptions, ModelSource};
use crate::models::{Logits, SeqInput};
use crate::stopping::FinishReason;

fn pipeline() -> Arc<Pipeline> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    let files =
        resolve(&ModelSource::Local(dir), &HubOptions::from_env()).expect("fixture resolves");
    Arc::new(
        Pipeline::load(
            &files,
            DType::F32,
            &Device::Cpu,
            crate::quant::Quant::None,
            None,
        )
        .expect("fixture loads"),
    )
}

fn greedy(prompt: Vec<u32>, n: usize) -> Request {
    Request {
        prompt,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: StopConditions {
            max_new_tokens: n,
            ignore_eos: true,
            ..Default::default()
        },
        logprobs: Some(0),
        prompt_logprobs: false,
        constraint: None,
    }
}

/// What a request produced: token ids, their logprobs, the usage.
#[derive(Debug, Default, Clone)]
struct Output {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    prompt_logprobs: Vec<Option<f32>>,
    usage: Option<Usage>,
    finish: Option<FinishReason>,
    error: Option<String>,
}

/// A sink collecting what a request produced.
fn collector() -> (Box<dyn Sink>, Arc<Mutex<Output>>) {
    let out = Arc::new(Mutex::new(Output::default()));
    let o = out.clone();
    let sink = move |e: Event| {
        let mut g = o.lock().expect("lock");
        match e {
            Event::Token { id, logprob, .. } if id != u32::MAX => {
                g.tokens.push(id);
                g.logprobs.extend(logprob.map(|l| l.logprob));
            }
            Event::PromptLogprobs(v) => {
                g.prompt_logprobs = v.into_iter().map(|l| l.map(|l| l.logprob)).collect()
            }
            Event::Done { usage, finish, .. } => {
                g.usage = Some(usage);
                g.finish = Some(finish);
            }
            Event::Error(e) => g.error = Some(e),
            _ => {}
        }
        true
    };
    (Box::new(sink), out)
}

fn limits(max_batch: usize, max_batched_tokens: usize, prefix_cache: bool) -> EngineLimits {
    EngineLimits {
        max_batch,
        max_batched_tokens,
        prefix_cache,
        ..EngineLimits::default()
    }
}

/// Prompt `i` of lengths 3 to 198 tokens.
fn prompt(i: usize) -> Vec<u32> {
    (0..(3 + 13 * i))
        .map(|t| ((t * 7 + i * 13) % 380) as u32)
        .collect()
}

/// Each request run by itself in a fresh engine, whole prompt at once.
fn alone(p: &Arc<Pipeline>, requests: &[Request]) -> Vec<Output> {
    requests
        .iter()
        .map(|r| {
            let mut e = Engine::new(p.clone(), limits(1, 4096, false), Arc::default());
            let (sink, out) = collector();
            e.submit(r.clone(), sink);
            e.run_to_completion();
            let o = out.lock().expect("lock").clone();
            assert!(o.error.is_none(), "{:?}", o.error);
            o
        })
        .collect()
}

/// A seeded request that samples (temperature, top-p, top-k): the same
/// seed must give the same tokens however the engine schedules it.
fn seeded(prompt: Vec<u32>, n: usize, seed: u64) -> Request {
    let mut r = greedy(prompt, n);
    r.sampling = SamplingParams {
        temperature: 1.3,
        top_p: 0.9,
        top_k: Some(50),
        seed: Some(seed),
        ..Default::default()
    };
    r
}

/// Same tokens and bit-identical logprobs: a token's logits depend on
/// its sequence alone, not on batching, chunking, the prefix cache or
/// preemption (issue 11).
fn assert_same(got: &Output, want: &Output, what: &str) {
    assert_eq!(got.error, None, "{what}");
    assert_eq!(got.tokens, want.tokens, "{what}: tokens");
    assert_eq!(got.logprobs.len(), want.logprobs.len(), "{what}");
    for (i, (a, b)) in got.logprobs.iter().zip(&want.logprobs).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: logprob {i}: {a} vs {b}");
    }
}

#[test]
fn sixteen_concurrent_requests_give_what_each_gives_alone() {
    let p = pipeline();
    // Every other request samples with its own seed.
    let requests: Vec<Request> = (0..16)
        .map(|i| match i % 2 {
            0 => greedy(prompt(i), 6 + i % 5),
            _ => seeded(prompt(i), 6 + i % 5, i as u64),
        })
        .collect();
    let want = alone(&p, &requests);
    // 64 tokens a step: the longer prompts are computed in chunks while
    // the others decode.
    let metrics = Arc::new(Metrics::default());
    let mut e = Engine::new(p.clone(), limits(16, 64, true), metrics.clone());
    let outs: Vec<_> = requests
        .iter()
        .map(|r| {
            let (sink, out) = collector();
            e.submit(r.clone(), sink);
            out
        })
        .collect();
    let mut steps = 0;
    while !e.is_idle() {
        e.step();
        steps += 1;
        assert!(e.running() <= 16 && metrics.kv_blocks_used.get() <= metrics.kv_blocks_total.get());
    }
    for (i, out) in outs.iter().enumerate() {
        assert_same(
            &out.lock().expect("lock"),
            &want[i],
            &format!("request {i}"),
        );
    }
    let total: usize = requests.iter().map(|r| r.prompt.len()).sum();
    assert!(steps > total / 64, "prompts were chunked ({steps} steps)");
    assert_eq!(e.kv_blocks_used().0, 0, "finished sequences hold no blocks");
}

#[test]
fn a_long_prompt_does_not_stall_running_decodes() {
    let p = pipeline();
    let mut e = Engine::new(p, limits(4, 32, false), Arc::default());
    let (sink, short) = collector();
    e.submit(greedy(vec![1, 2, 3], 20), sink);
    e.step();
    assert_eq!(short.lock().expect("lock").tokens.len(), 1);
    let (sink, long) = collector();
    e.submit(greedy(prompt(30), 2), sink);
    // 393 prompt tokens at 31 a step: the short request gets a token
    // every step meanwhile, the long one none until its last chunk.
    for step in 2..=10 {
        e.step();
        assert_eq!(short.lock().expect("lock").tokens.len(), step);
        assert!(long.lock().expect("lock").tokens.is_empty());
    }
    e.run_to_completion();
    assert_eq!(long.lock().expect("lock").tokens.len(), 2);
}

#[test]
fn chunked_prefill_gives_the_logits_of_one_pass() -> Result<()> {
    let p = pipeline();
    let model = &p.model;
    let tokens = prompt(25);
    let mut cache = model.new_cache();
    let whole = model.forward(&mut [SeqInput {
        tokens: &tokens,
        cache: &mut cache,
        logits: Logits::All,
    }])?;
    let whole = whole[0].to_vec2::<f32>()?;
    let mut cache = model.new_cache();
    let mut rows = Vec::new();
    for chunk in tokens.chunks(37) {
        let out = model.forward(&mut [SeqInput {
            tokens: chunk,
            cache: &mut cache,
            logits: Logits::All,
        }])?;
        rows.extend(out[0].to_vec2::<f32>()?);
    }
    assert_eq!(rows.len(), whole.len());
    for (a, b) in rows.iter().flatten().zip(whole.iter().flatten()) {
        assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
    }

    // The same through the engine: echoed prompt logprobs, in chunks of
    // 16 or all at once.
    let mut request = greedy(tokens, 3);
    request.prompt_logprobs = true;
    let want = &alone(&p, std::slice::from_ref(&request))[0];
    let mut e = Engine::new(p.clone(), limits(2, 16, true), Arc::default());
    let (sink, out) = collector();
    e.submit(request, sink);
    e.run_to_completion();
    let got = out.lock().expect("lock");
    assert_same(&got, want, "chunked");
    assert_eq!(got.prompt_logprobs.len(), want.prompt_logprobs.len());
    assert!(got.prompt_logprobs[0].is_none() && got.prompt_logprobs[1].is_some());
    for (a, b) in got
        .prompt_logprobs
        .iter()
        .zip(&want.prompt_logprobs)
        .skip(1)
    {
        let (a, b) = (a.expect("known"), b.expect("known"));
        assert_eq!(a.to_bits(), b.to_bits(), "{a} vs {b}");
    }
    Ok(())
}

#[test]
fn a_shared_prefix_is_reused_by_block_and_changes_nothing() {
    let p = pipeline();
    let metrics = Arc::new(Metrics::default());
    let mut e = Engine::new(p.clone(), limits(4, 512, true), metrics.clone());
    // A 100-token "system prompt", then two different questions.
    let system: Vec<u32> = (0..100).map(|t| (t * 11) % 380).collect();
    let ask = |q: &[u32]| {
        let mut v = system.clone();
        v.extend_from_slice(q);
        v
    };
    let (sink, _) = collector();
    e.submit(greedy(ask(&[5, 6, 7]), 4), sink);
    e.run_to_completion();
    assert_eq!(metrics.prefix_cache_hits.get(), 0);
    let (_, cached) = e.kv_blocks_used();
    assert_eq!(cached, 7, "103 + 3 positions kept: 7 blocks");

    let second = greedy(ask(&[9, 8, 7, 6]), 8);
    let (sink, out) = collector();
    e.submit(second.clone(), sink);
    e.run_to_completion();
    let with_cache = out.lock().expect("lock").clone();
    // The shared 100 tokens hold 6 whole blocks of 16.
    assert_eq!(with_cache.usage.expect("done").cached_tokens, 96);
    assert_eq!(metrics.prefix_cache_hit_tokens.get(), 96);
    assert_eq!(metrics.prefix_cache_queries.get(), 2);
    assert_eq!(metrics.prefix_cache_hits.get(), 1);
    assert_same(&with_cache, &alone(&p, &[second])[0], "from the cache");

    // Hits of 1, 2 and 5 blocks (a prompt that shares 16, 32 or 80
    // tokens with one served before), greedy and seeded, each against
    // the same request in a fresh engine.
    for blocks in [1usize, 2, 5] {
        let mut e = Engine::new(p.clone(), limits(4, 512, true), Arc::default());
        let shared = &system[..blocks * 16];
        let mut earlier = shared.to_vec();
        earlier.extend([300, 301, 302]);
        let (sink, _) = collector();
        e.submit(greedy(earlier, 2), sink);
        e.run_to_completion();
        let mut prompt = shared.to_vec();
        prompt.extend((0..(blocks * 7) as u32).map(|t| 200 + t));
        // The seeded request comes second and finds the greedy one's
        // whole prompt cached: a longer hit.
        let hits = [blocks * 16, (prompt.len() - 1) / 16 * 16];
        for (request, hit) in [greedy(prompt.clone(), 8), seeded(prompt.clone(), 8, 3)]
            .into_iter()
            .zip(hits)
        {
            let (sink, out) = collector();
            e.submit(request.clone(), sink);
            e.run_to_completion();
            let got = out.lock().expect("lock").clone();
            assert_eq!(got.usage.expect("done").cached_tokens, hit);
            assert_same(
                &got,
                &alone(&p, &[request])[0],
                &format!("{blocks} cached blocks"),
            );
        }
    }
}

#[test]
fn a_sink_that_stops_listening_cancels_its_request() {
    let p = pipeline();
    let metrics = Arc::new(Metrics::default());
    let mut e = Engine::new(p, limits(4, 512, false), metrics.clone());
    let mut seen = 0;
    let sink = move |e: Event| {
        if matches!(e, Event::Token { .. }) {
            seen += 1;
        }
        seen < 3
    };
    e.submit(greedy(vec![1, 2, 3], 100), Box::new(sink));
    let mut steps = 0;
    while !e.is_idle() {
        e.step();
        steps += 1;
    }
    assert_eq!(steps, 3, "cancelled after the third token");
    assert_eq!(metrics.cancelled.get(), 1);
    assert_eq!(metrics.running.get(), 0);
    assert_eq!(metrics.kv_blocks_used.get(), 0);
}

/// A sink whose caller can hang up without being sent anything.
struct Closable(Arc<AtomicBool>);

impl Sink for Closable {
    fn send(&mut self, _: Event) -> bool {
        !self.0.load(Ordering::SeqCst)
    }
    fn is_closed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[test]
fn a_request_cancelled_mid_prompt_frees_its_blocks_at_once() {
    let p = pipeline();
    let metrics = Arc::new(Metrics::default());
    let mut e = Engine::new(p, limits(4, 16, false), metrics.clone());
    let closed = Arc::new(AtomicBool::new(false));
    e.submit(greedy(prompt(20), 10), Box::new(Closable(closed.clone())));
    e.step();
    e.step();
    // 263 prompt tokens reserved: 17 blocks, 32 positions computed.
    assert_eq!(e.kv_blocks_used(), (17, 0));
    assert_eq!(metrics.kv_blocks_used.get(), 17);
    closed.store(true, Ordering::SeqCst);
    e.step();
    assert!(e.is_idle());
    assert_eq!(e.kv_blocks_used(), (0, 0));
    assert_eq!(metrics.kv_blocks_used.get(), 0);
    assert_eq!(metrics.cancelled.get(), 1);
}

#[test]
fn a_budget_too_small_for_everyone_waits_and_preempts_without_changing_outputs() {
    let p = pipeline();
    let requests: Vec<Request> = (0..8)
        .map(|i| match i % 2 {
            0 => greedy(prompt(i % 4 + 1), 40),
            _ => seeded(prompt(i % 4 + 1), 40, 100 + i as u64),
        })
        .collect();
    let want = alone(&p, &requests);
    // 12 blocks (192 positions); each request needs 4 to 6 alone (16 to
    // 55 prompt tokens, 40 new), so at most a few fit at once and
    // growing ones must push others out.
    let metrics = Arc::new(Metrics::default());
    let bytes = blocks::bytes_per_position(&p.model) * 16 * 12;
    let mut e = Engine::new(
        p.clone(),
        EngineLimits {
            kv_cache_bytes: Some(bytes),
            ..limits(8, 64, true)
        },
        metrics.clone(),
    );
    assert_eq!(e.kv_budget().total_blocks, 12);
    let outs: Vec<_> = requests
        .iter()
        .map(|r| {
            let (sink, out) = collector();
            e.submit(r.clone(), sink);
            out
        })
        .collect();
    let mut most_waiting = 0;
    while !e.is_idle() {
        e.step();
        most_waiting = most_waiting.max(e.waiting());
        assert!(metrics.kv_blocks_used.get() <= 12);
    }
    assert!(most_waiting > 0, "some requests waited for memory");
    assert!(metrics.preempted.get() > 0, "some sequences were preempted");
    for (i, out) in outs.iter().enumerate() {
        let got = out.lock().expect("lock");
        assert_same(&got, &want[i], &format!("request {i}"));
        assert_eq!(got.tokens.len(), 40, "nothing sent twice");
    }
}

#[test]
fn a_prompt_larger_than_the_whole_budget_is_refused() {
    let p = pipeline();
    let bytes = blocks::bytes_per_position(&p.model) * 16 * 2;
    let mut e = Engine::new(
        p.clone(),
        EngineLimits {
            kv_cache_bytes: Some(bytes),
            ..EngineLimits::default()
        },
        Arc::default(),
    );
    let (sink, out) = collector();
    e.submit(greedy(prompt(5), 4), sink);
    let (sink, fits) = collector();
    e.submit(greedy(vec![1, 2, 3], 4), sink);
    e.run_to_completion();
    let error = out.lock().expect("lock").error.clone().expect("refused");
    assert!(error.contains("--kv-cache-mem"), "{error}");
    assert_eq!(fits.lock().expect("lock").tokens.len(), 4);
}

/// A request constrained to `spec`, greedy or seeded, ending on EOS.
fn constrained(p: &Pipeline, prompt: Vec<u32>, spec: ConstraintSpec, seed: Option<u64>) -> Request {
    let mut r = match seed {
        Some(seed) => seeded(prompt, 200, seed),
        None => greedy(prompt, 200),
    };
    r.stop.ignore_eos = false;
    r.stop.eos_ids = p.eos_ids.clone();
    r.constraint = Some(p.compile_constraint(&spec).expect("compiles"));
    r
}

fn text(p: &Pipeline, out: &Output) -> String {
    p.tokenizer.decode(&out.tokens, true).expect("decodes")
}

#[test]
fn a_constrained_sequence_follows_its_grammar_and_ends_with_stop() {
    let p = pipeline();
    let choices = vec!["red".to_string(), "green".into(), "blue".into()];
    for (i, seed) in [None, Some(1), Some(2), Some(3)].into_iter().enumerate() {
        let r = constrained(&p, prompt(i), ConstraintSpec::Choice(choices.clone()), seed);
        let out = &alone(&p, &[r])[0];
        assert!(choices.contains(&text(&p, out)), "{:?}", text(&p, out));
        assert_eq!(out.finish, Some(FinishReason::Stop));
        // Logprobs come from the masked distribution: finite, never
        // below the log of the smallest share a kept token can have.
        assert!(out.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
}

#[test]
fn constrained_and_free_sequences_batch_and_survive_preemption() {
    let p = pipeline();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
            "s": {"enum": ["x", "y"]}
        },
        "required": ["n", "s"],
        "additionalProperties": false
    });
    let requests: Vec<Request> = (0..8)
        .map(|i| match i % 4 {
            0 => constrained(
                &p,
                prompt(i + 1),
                ConstraintSpec::JsonSchema(schema.clone()),
                None,
            ),
            1 => constrained(
                &p,
                prompt(i + 1),
                ConstraintSpec::Regex("[a-f]{20,30}".into()),
                Some(i as u64),
            ),
            2 => greedy(prompt(i + 1), 40),
            _ => seeded(prompt(i + 1), 40, 100 + i as u64),
        })
        .collect();
    let want = alone(&p, &requests);
    for (i, w) in want.iter().enumerate() {
        match i % 4 {
            0 => {
                let v: serde_json::Value = serde_json::from_str(&text(&p, w)).expect("JSON");
                assert!(
                    v["n"].as_i64().is_some_and(|n| (0..=99).contains(&n)),
                    "{v}"
                );
                assert!(v["s"] == "x" || v["s"] == "y", "{v}");
            }
            1 => {
                let t = text(&p, w);
                assert!(
                    (20..=30).contains(&t.len()) && t.chars().all(|c| ('a'..='f').contains(&c)),
                    "{t:?}"
                );
            }
            _ => {}
        }
    }
    // 12 blocks for eight sequences: some wait, some are preempted and
    // recomputed; every output must be what it is alone.
    let metrics = Arc::new(Metrics::default());
    let bytes = blocks::bytes_per_position(&p.model) * 16 * 12;
    let mut e = Engine::new(
        p.clone(),
        EngineLimits {
            kv_cache_bytes: Some(bytes),
            ..limits(8, 64, true)
        },
        metrics.clone(),
    );
    let outs: Vec<_> = requests
        .iter()
        .map(|r| {
            let (sink, out) = collector();
            e.submit(r.clone(), sink);
            out
        })
        .collect();
    e.run_to_completion();
    assert!(metrics.preempted.get() > 0, "some sequences were preempted");
    for (i, out) in outs.iter().enumerate() {
        let got = out.lock().expect("lock");
        assert_same(&got, &want[i], &format!("request {i}"));
        assert_eq!(got.finish, want[i].finish, "request {i}");
    }
}
