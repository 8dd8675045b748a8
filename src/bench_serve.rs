//! `taper bench serve`: a load generator for an OpenAI-compatible server,
//! measured the way vLLM's `benchmark_serving.py` measures: `concurrency`
//! clients each stream one `/v1/completions` request after another (fixed
//! prompt and output lengths, `ignore_eos`) until `requests` are done; each
//! streamed chunk is timestamped on arrival. The report gives requests/s,
//! aggregate output tokens/s, and time to first token (TTFT), inter-token
//! latency (ITL, the gap between consecutive chunks), time per output token
//! (TPOT, a request's decode time over its tokens after the first) and
//! end-to-end latency, as mean, p50/p95/p99 and max.
//!
//! Prompts are token ids (`prompt: [ids]`), so their length is exact
//! whatever the tokenizer: a shared prefix of `shared_prefix_tokens` (the
//! same for every request, as a system prompt is) then `prompt_tokens`
//! drawn at random per request. Requests ask for `logprobs: 0`, so the
//! server sends one chunk per token even when a token completes no text.
//!
//! This module talks HTTP only (blocking `ureq`, one thread per client);
//! `src/cli/bench.rs` parses the flags and prints the report.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{Error, Result};

/// What to send, how often, how many at once.
#[derive(Debug, Clone)]
pub struct ServeBench {
    /// The server's base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// The model name to ask for; `None`: the first `/v1/models` lists.
    pub model: Option<String>,
    /// Clients streaming at once.
    pub concurrency: usize,
    /// Requests to complete (timed).
    pub requests: usize,
    /// Untimed requests sent first, one at a time.
    pub warmup: usize,
    /// Random prompt tokens per request (after the shared prefix).
    pub prompt_tokens: usize,
    /// Tokens every prompt starts with, the same for all requests.
    pub shared_prefix_tokens: usize,
    /// Tokens generated per request (`max_tokens`, with `ignore_eos`).
    pub max_tokens: usize,
    /// Prompt token ids are drawn from `0..max_token_id`.
    pub max_token_id: u32,
    pub seed: u64,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Stats {
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    /// From samples in seconds; all zero when there are none.
    pub fn of(samples_s: &[f64]) -> Stats {
        if samples_s.is_empty() {
            return Stats::default();
        }
        let mut v: Vec<f64> = samples_s.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        Stats {
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
            p50_ms: percentile(&v, 50.0),
            p95_ms: percentile(&v, 95.0),
            p99_ms: percentile(&v, 99.0),
            max_ms: v[v.len() - 1],
        }
    }
}

/// The `q`th percentile of sorted samples, interpolating linearly between
/// the two nearest ranks (numpy's default, as vLLM reports).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = q / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// The whole run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub model: String,
    pub concurrency: usize,
    pub prompt_tokens: usize,
    pub shared_prefix_tokens: usize,
    pub max_tokens: usize,
    pub completed: usize,
    pub failed: usize,
    /// The first failure's message, if any failed.
    pub first_error: Option<String>,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub ttft: Stats,
    pub tpot: Stats,
    pub itl: Stats,
    pub e2e_latency: Stats,
}

/// One request as the client saw it.
#[derive(Debug, Clone, Default)]
struct Outcome {
    ttft: f64,
    itls: Vec<f64>,
    latency: f64,
    prompt_tokens: usize,
    output_tokens: usize,
}

/// Runs the benchmark: warm-up, then the timed requests.
pub fn run(bench: &ServeBench) -> Result<Report> {
    if bench.concurrency == 0 || bench.requests == 0 {
        return Err(Error::InvalidRequest(
            "the concurrency and the number of requests must be at least 1".into(),
        ));
    }
    let base = bench.url.trim_end_matches('/').to_string();
    let agent = ureq::AgentBuilder::new()
        .timeout(bench.timeout)
        .max_idle_connections_per_host(bench.concurrency.max(1))
        .build();
    let model = match &bench.model {
        Some(m) => m.clone(),
        None => first_model(&agent, &base, bench.api_key.as_deref())?,
    };
    let mut rng = StdRng::seed_from_u64(bench.seed);
    let prefix: Vec<u32> = (0..bench.shared_prefix_tokens)
        .map(|_| rng.random_range(0..bench.max_token_id.max(1)))
        .collect();
    let prompt = |i: usize| -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(bench.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9));
        let mut p = prefix.clone();
        p.extend((0..bench.prompt_tokens).map(|_| rng.random_range(0..bench.max_token_id.max(1))));
        p
    };
    let client = Client {
        agent,
        url: format!("{base}/v1/completions"),
        model: model.clone(),
        api_key: bench.api_key.clone(),
        max_tokens: bench.max_tokens,
    };
    for w in 0..bench.warmup {
        client.send(&prompt(bench.requests + w))?;
    }

    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<std::result::Result<Outcome, String>>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..bench.concurrency.min(bench.requests) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= bench.requests {
                    return;
                }
                let outcome = client.send(&prompt(i)).map_err(|e| e.to_string());
                if let Ok(mut r) = results.lock() {
                    r.push(outcome);
                }
            });
        }
    });
    let duration_s = started.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap_or_default();
    let first_error = results.iter().find_map(|r| r.as_ref().err().cloned());
    let ok: Vec<Outcome> = results.into_iter().filter_map(|r| r.ok()).collect();
    let failed = bench.requests - ok.len();
    let total_output_tokens: usize = ok.iter().map(|o| o.output_tokens).sum();
    let tpots: Vec<f64> = ok
        .iter()
        .filter(|o| o.output_tokens > 1)
        .map(|o| (o.latency - o.ttft) / (o.output_tokens - 1) as f64)
        .collect();
    let itls: Vec<f64> = ok.iter().flat_map(|o| o.itls.iter().copied()).collect();
    Ok(Report {
        url: base,
        model,
        concurrency: bench.concurrency,
        prompt_tokens: bench.shared_prefix_tokens + bench.prompt_tokens,
        shared_prefix_tokens: bench.shared_prefix_tokens,
        max_tokens: bench.max_tokens,
        completed: ok.len(),
        failed,
        first_error,
        duration_s,
        total_input_tokens: ok.iter().map(|o| o.prompt_tokens).sum(),
        total_output_tokens,
        request_throughput: ok.len() as f64 / duration_s,
        output_throughput: total_output_tokens as f64 / duration_s,
        ttft: Stats::of(&ok.iter().map(|o| o.ttft).collect::<Vec<_>>()),
        tpot: Stats::of(&tpots),
        itl: Stats::of(&itls),
        e2e_latency: Stats::of(&ok.iter().map(|o| o.latency).collect::<Vec<_>>()),
    })
}

fn http_error(url: &str, e: ureq::Error) -> Error {
    let message = match e {
        ureq::Error::Status(code, r) => {
            format!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        ureq::Error::Transport(t) => match t.message() {
            Some(m) => format!("{}: {m}", t.kind()),
            None => t.kind().to_string(),
        },
    };
    Error::Http {
        url: url.to_string(),
        message,
    }
}

/// The id of the first model `/v1/models` lists.
fn first_model(agent: &ureq::Agent, base: &str, api_key: Option<&str>) -> Result<String> {
    let url = format!("{base}/v1/models");
    let mut req = agent.get(&url);
    if let Some(key) = api_key {
        req = req.set("Authorization", &format!("Bearer {key}"));
    }
    let body: Value = req
        .call()
        .map_err(|e| http_error(&url, e))?
        .into_json()
        .map_err(|e| Error::Http {
            url: url.clone(),
            message: format!("not JSON: {e}"),
        })?;
    body["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Http {
            url,
            message: "lists no model: pass --model NAME".into(),
        })
}

struct Client {
    agent: ureq::Agent,
    url: String,
    model: String,
    api_key: Option<String>,
    max_tokens: usize,
}

impl Client {
    /// Streams one completion, timestamping each chunk that carries tokens.
    fn send(&self, prompt: &[u32]) -> Result<Outcome> {
        let body = json!({
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "ignore_eos": true,
            "temperature": 0.0,
            "logprobs": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let mut req = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        let start = Instant::now();
        let response = req
            .send_string(&body.to_string())
            .map_err(|e| http_error(&self.url, e))?;
        let fail = |message: String| Error::Http {
            url: self.url.clone(),
            message,
        };
        let mut out = Outcome {
            prompt_tokens: prompt.len(),
            ..Outcome::default()
        };
        let mut last: Option<Instant> = None;
        let mut chunks = 0;
        let mut usage_tokens = None;
        let mut done = false;
        for line in BufReader::new(response.into_reader()).lines() {
            let line = line.map_err(|e| fail(format!("reading the stream: {e}")))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let now = Instant::now();
            let chunk: Value = serde_json::from_str(data)
                .map_err(|e| fail(format!("a chunk is not JSON: {e}")))?;
            if let Some(e) = chunk.get("error") {
                return Err(fail(format!("error in the stream: {e}")));
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(n as usize);
            }
            let Some(choice) = chunk["choices"].get(0) else {
                continue;
            };
            let tokens = match choice["logprobs"]["tokens"].as_array() {
                Some(t) => t.len(),
                None => usize::from(choice["text"].as_str().is_some_and(|t| !t.is_empty())),
            };
            if tokens == 0 {
                continue;
            }
            match last {
                None => out.ttft = now.duration_since(start).as_secs_f64(),
                Some(prev) => out.itls.push(now.duration_since(prev).as_secs_f64()),
            }
            last = Some(now);
            chunks += tokens;
        }
        if !done {
            return Err(fail("the stream ended before [DONE]".into()));
        }
        out.latency = start.elapsed().as_secs_f64();
        out.output_tokens = usage_tokens.unwrap_or(chunks);
        Ok(out)
    }
}

/// The report as Markdown: the run, then one row per latency.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    out += "| url | model | concurrency | prompt tokens (shared) | max tokens | completed | failed | duration s | req/s | output tok/s |\n";
    out += "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    out += &format!(
        "| {} | {} | {} | {} ({}) | {} | {} | {} | {:.2} | {:.3} | {:.2} |\n\n",
        r.url,
        r.model,
        r.concurrency,
        r.prompt_tokens,
        r.shared_prefix_tokens,
        r.max_tokens,
        r.completed,
        r.failed,
        r.duration_s,
        r.request_throughput,
        r.output_throughput
    );
    out += "| latency (ms) | mean | p50 | p95 | p99 | max |\n";
    out += "| --- | ---: | ---: | ---: | ---: | ---: |\n";
    for (name, s) in [
        ("TTFT", r.ttft),
        ("TPOT", r.tpot),
        ("ITL", r.itl),
        ("E2E", r.e2e_latency),
    ] {
        out += &format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            s.mean_ms, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
        );
    }
    if let Some(e) = &r.first_error {
        out += &format!("\nfirst error: {e}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 95.0) - 3.85).abs() < 1e-12);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        let s = Stats::of(&[0.001, 0.003]);
        assert_eq!((s.mean_ms, s.p50_ms), (2.0, 2.0));
        assert_eq!(Stats::of(&[]), Stats::default());
    }
}
