//! Counters, gauges and histograms shared by the engine and the server,
//! rendered in Prometheus' text format for `GET /metrics`.
//!
//! Plain atomics: the engine thread updates them on every token, so they
//! must cost next to nothing and never block.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, so it fits an integer atomic.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        for (i, &le) in BUCKETS.iter().enumerate() {
            if secs <= le {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((secs * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// Everything `/metrics` reports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub running: Gauge,
    pub waiting: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub prefix_cache_hit_tokens: Counter,
    /// Admissions that looked up the prefix cache, and those that hit.
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    /// KV blocks in the budget, in use (sequences and prefix cache), and
    /// held by the prefix cache alone (evictable).
    pub kv_blocks_total: Gauge,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_cached: Gauge,
    /// Running sequences sent back to the queue to free KV memory.
    pub preempted: Counter,
    pub cancelled: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// HTTP requests by status code.
    requests: Mutex<BTreeMap<u16, u64>>,
}

impl Metrics {
    /// Counts a finished HTTP request.
    pub fn request_done(&self, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry(status).or_insert(0) += 1;
        }
    }

    /// HTTP requests answered with `status` so far.
    pub fn requests_with_status(&self, status: u16) -> u64 {
        self.requests
            .lock()
            .map(|m| m.get(&status).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "taper_requests_running",
            "Sequences in the running batch.",
            self.running.get(),
        );
        gauge(
            &mut out,
            "taper_requests_waiting",
            "Requests waiting for the batch.",
            self.waiting.get(),
        );
        counter(
            &mut out,
            "taper_prompt_tokens_total",
            "Prompt tokens computed.",
            self.prompt_tokens.get(),
        );
        counter(
            &mut out,
            "taper_generation_tokens_total",
            "Tokens generated.",
            self.generation_tokens.get(),
        );
        counter(
            &mut out,
            "taper_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache.",
            self.prefix_cache_hit_tokens.get(),
        );
        counter(
            &mut out,
            "taper_prefix_cache_queries_total",
            "Admissions that looked up the prefix cache.",
            self.prefix_cache_queries.get(),
        );
        counter(
            &mut out,
            "taper_prefix_cache_hits_total",
            "Admissions that reused at least one cached KV block.",
            self.prefix_cache_hits.get(),
        );
        gauge(
            &mut out,
            "taper_kv_blocks_total",
            "KV cache blocks the memory budget holds.",
            self.kv_blocks_total.get(),
        );
        gauge(
            &mut out,
            "taper_kv_blocks_used",
            "KV cache blocks in use, by sequences and the prefix cache.",
            self.kv_blocks_used.get(),
        );
        gauge(
            &mut out,
            "taper_kv_blocks_cached",
            "KV cache blocks held by the prefix cache (evicted first).",
            self.kv_blocks_cached.get(),
        );
        counter(
            &mut out,
            "taper_requests_preempted_total",
            "Running sequences sent back to the queue to free KV memory.",
            self.preempted.get(),
        );
        counter(
            &mut out,
            "taper_requests_cancelled_total",
            "Requests cancelled by their client.",
            self.cancelled.get(),
        );
        let _ = writeln!(out, "# HELP taper_http_requests_total HTTP requests by status.\n# TYPE taper_http_requests_total counter");
        if let Ok(map) = self.requests.lock() {
            for (status, n) in map.iter() {
                let _ = writeln!(out, "taper_http_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        self.time_to_first_token.render(
            &mut out,
            "taper_time_to_first_token_seconds",
            "Time from submission (queueing included) to the first token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "taper_inter_token_latency_seconds",
            "Mean time between tokens of a request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(0.02);
        h.observe(3.0);
        let mut s = String::new();
        h.render(&mut s, "x", "y");
        assert!(s.contains("x_bucket{le=\"0.025\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"5\"} 2"), "{s}");
        assert!(s.contains("x_count 2"), "{s}");
    }

    #[test]
    fn renders_requests_by_status() {
        let m = Metrics::default();
        m.request_done(200);
        m.request_done(200);
        m.request_done(400);
        let s = m.render();
        assert!(
            s.contains("taper_http_requests_total{status=\"200\"} 2"),
            "{s}"
        );
        assert!(
            s.contains("taper_http_requests_total{status=\"400\"} 1"),
            "{s}"
        );
        assert_eq!(m.requests_with_status(200), 2);
    }
}
