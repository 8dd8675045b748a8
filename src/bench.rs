//! The tokens-per-second benchmark, measured the way llama.cpp's
//! `llama-bench` measures: prompt processing and text generation timed
//! separately, after a warm-up run, as the mean ± standard deviation of
//! several repetitions.
//!
//! A test is one row of the report: `pp{p}` is one forward pass over `p`
//! tokens, `tg{n}` is `n` one-token decode steps, either of them after a
//! context of `d` tokens that is filled first and not timed (`@ d{d}`).
//! Token ids are random and valid, so tokenization and sampling are not part
//! of the measurement: each decode step feeds the next random id instead of
//! picking one from the logits. This module talks only to
//! [`Decoder::forward`] and the [`SeqKvCache`] it fills; `taper bench`
//! (`src/cli/bench.rs`) parses the flags and prints the report.
//!
//! Beyond `llama-bench`, [`memory_read_bandwidth`] measures how fast the
//! machine streams memory, which bounds decoding: each decode step reads
//! every weight once, so no run can beat `bandwidth / weight bytes` tokens
//! per second ([`weight_bytes_per_token`]).
//!
//! Threads: candle 0.11.1 has no setter for its CPU thread count. It reads
//! `RAYON_NUM_THREADS` (then `CANDLE_NUM_THREADS` for its own barrier pool)
//! when its pools start and, for the thread count it hands `gemm`, at every
//! matmul; [`set_cpu_threads`] sets both before any of that happens.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::Instant;

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::kv_cache::SeqKvCache;
use crate::models::{Decoder, Logits, SeqInput};
use crate::{Error, Result};

/// The context before a test is filled in passes of at most this many
/// tokens (`llama-bench`'s micro-batch), so a deep context does not build
/// one huge attention matrix.
const DEPTH_CHUNK: usize = 512;

/// One row of the benchmark: what is timed, after how much context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Test {
    /// Tokens in the timed forward pass (0 for a generation test).
    pub n_prompt: usize,
    /// One-token decode steps timed (0 for a prompt test).
    pub n_gen: usize,
    /// Tokens already in the cache when the timer starts.
    pub n_depth: usize,
}

impl Test {
    /// `pp512`, `tg128`, `pp512 @ d4096`: `llama-bench`'s names.
    pub fn name(&self) -> String {
        let base = if self.n_prompt > 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        if self.n_depth > 0 {
            format!("{base} @ d{}", self.n_depth)
        } else {
            base
        }
    }

    /// Tokens computed while the timer runs.
    pub fn timed_tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }

    /// Positions the test needs in the cache.
    pub fn context(&self) -> usize {
        self.n_depth + self.n_prompt + self.n_gen
    }

    /// Whether this is a text-generation (decode) test.
    pub fn is_generation(&self) -> bool {
        self.n_gen > 0
    }
}

/// The rows for lists of prompt lengths, generation lengths and depths, in
/// `llama-bench`'s order: for each depth, every prompt test, then every
/// generation test. A length of 0 contributes no row.
pub fn expand_tests(prompts: &[usize], gens: &[usize], depths: &[usize]) -> Result<Vec<Test>> {
    let mut tests = Vec::new();
    for &n_depth in depths {
        for &n_prompt in prompts.iter().filter(|&&p| p > 0) {
            tests.push(Test {
                n_prompt,
                n_gen: 0,
                n_depth,
            });
        }
        for &n_gen in gens.iter().filter(|&&n| n > 0) {
            tests.push(Test {
                n_prompt: 0,
                n_gen,
                n_depth,
            });
        }
    }
    if tests.is_empty() {
        return Err(Error::InvalidRequest(
            "nothing to measure: every prompt length (-p) and generation length (-n) is 0, or no depth (-d) was given".into(),
        ));
    }
    Ok(tests)
}

/// Arithmetic mean; 0 for no values.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Sample standard deviation (with Bessel's correction, as `llama-bench`);
/// 0 for fewer than two values.
pub fn stddev(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let m = mean(values);
    let ss: f64 = values.iter().map(|v| (v - m) * (v - m)).sum();
    (ss / (values.len() - 1) as f64).sqrt()
}

/// One timed repetition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub secs: f64,
    pub tokens_per_sec: f64,
}

/// A test's repetitions.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub test: Test,
    pub samples: Vec<Sample>,
}

impl Measurement {
    fn rates(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.tokens_per_sec).collect()
    }

    /// Mean tokens per second over the repetitions (each repetition's rate
    /// counts once, as in `llama-bench`).
    pub fn mean_tps(&self) -> f64 {
        mean(&self.rates())
    }

    pub fn stddev_tps(&self) -> f64 {
        stddev(&self.rates())
    }
}

/// Runs tests on one model, drawing token ids from a seeded stream.
pub struct Runner<'a> {
    model: &'a Decoder,
    rng: StdRng,
    warmup: bool,
}

impl<'a> Runner<'a> {
    pub fn new(model: &'a Decoder, seed: u64, warmup: bool) -> Self {
        Runner {
            model,
            rng: StdRng::seed_from_u64(seed),
            warmup,
        }
    }

    /// A warm-up run (unless disabled) and `reps` timed repetitions of `test`.
    ///
    /// One cache serves the warm-up and every repetition and is reset in
    /// between, keeping its buffers: like `llama-bench`'s preallocated
    /// context, no timed run pays for growing the cache.
    pub fn measure(&mut self, test: &Test, reps: usize) -> Result<Measurement> {
        let max = self.model.config().max_position_embeddings;
        if test.context() > max {
            return Err(Error::InvalidRequest(format!(
                "{} needs {} positions but the model's context is {max} (max_position_embeddings)",
                test.name(),
                test.context()
            )));
        }
        let mut cache = self.model.new_cache();
        if self.warmup {
            self.run_once(test, &mut cache)?;
        }
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            let secs = self.run_once(test, &mut cache)?.max(1e-9);
            samples.push(Sample {
                secs,
                tokens_per_sec: test.timed_tokens() as f64 / secs,
            });
        }
        Ok(Measurement {
            test: *test,
            samples,
        })
    }

    /// Fills the depth (untimed), then runs the test and returns its seconds.
    fn run_once(&mut self, test: &Test, cache: &mut SeqKvCache) -> Result<f64> {
        cache.reset();
        let depth = self.random_ids(test.n_depth);
        for chunk in depth.chunks(DEPTH_CHUNK) {
            self.step(chunk, cache)?;
        }
        let prompt = self.random_ids(test.n_prompt);
        let gen = self.random_ids(test.n_gen);
        sync(self.model.device())?;

        let start = Instant::now();
        if !prompt.is_empty() {
            self.step(&prompt, cache)?;
        }
        for token in gen.chunks(1) {
            self.step(token, cache)?;
        }
        sync(self.model.device())?;
        Ok(start.elapsed().as_secs_f64())
    }

    fn step(&self, tokens: &[u32], cache: &mut SeqKvCache) -> Result<()> {
        let logits = self.model.forward(&mut [SeqInput {
            tokens,
            cache,
            logits: Logits::Last,
        }])?;
        black_box(logits);
        Ok(())
    }

    fn random_ids(&mut self, n: usize) -> Vec<u32> {
        let vocab = self.model.config().vocab_size as u32;
        (0..n).map(|_| self.rng.random_range(0..vocab)).collect()
    }
}

/// Waits for queued GPU work, so the timer sees it; a no-op on the CPU.
fn sync(device: &Device) -> Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Bytes of weights one decode step reads: all of them, except that an
/// input embedding the head does not share (an untied one, or a tied one
/// whose head is a quantized copy, from `--quant` or a GGUF file)
/// contributes one row, not the table, and a mixture-of-experts layer
/// contributes its router and the `top_k` experts a token is routed to, not
/// every expert. (The KV cache adds `2 × layers × kv_heads × head_dim`
/// elements per cached position, negligible at small depths, and is not
/// counted.)
pub fn weight_bytes_per_token(model: &Decoder) -> usize {
    let c = model.config();
    let mut n = model.weight_bytes() - model.unrouted_expert_bytes();
    if !model.head_is_embedding_table() {
        let row = model.embedding_row_bytes();
        n = n.saturating_sub(row * c.vocab_size.saturating_sub(1));
    }
    n
}

/// Streaming-read bandwidth of main memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bandwidth {
    /// Bytes read per run.
    pub bytes: usize,
    pub threads: usize,
    /// The fastest run.
    pub best_secs: f64,
}

impl Bandwidth {
    /// Bytes per second of the fastest run.
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.best_secs
    }

    /// In GB/s (10⁹ bytes), as memory bandwidth is usually quoted.
    pub fn gb_per_sec(&self) -> f64 {
        self.bytes_per_sec() / 1e9
    }

    /// The decode speed this bandwidth allows when each token reads
    /// `bytes_per_token` bytes.
    pub fn bound_tps(&self, bytes_per_token: usize) -> f64 {
        self.bytes_per_sec() / bytes_per_token.max(1) as f64
    }
}

/// Reads a `bytes`-long buffer (make it much larger than the last-level
/// cache) with `threads` threads, each summing its own contiguous part,
/// `runs` times, and keeps the fastest run. The buffer is written first so
/// every page is resident before timing.
pub fn memory_read_bandwidth(bytes: usize, threads: usize, runs: usize) -> Bandwidth {
    let threads = threads.max(1);
    // Whole 64-byte lines per thread, so the parts are equal.
    let words = (bytes / 8).div_ceil(8 * threads).max(1) * 8 * threads;
    let part = words / threads;
    let mut buf = vec![0u64; words];
    std::thread::scope(|s| {
        for (i, chunk) in buf.chunks_mut(part).enumerate() {
            s.spawn(move || {
                for (j, w) in chunk.iter_mut().enumerate() {
                    *w = (i * part + j) as u64;
                }
            });
        }
    });

    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let start_line = Barrier::new(threads);
        // Each worker times its own read; the run lasts from the first
        // start to the last end. (Timing from the spawning thread would
        // start late whenever that thread is scheduled after the workers.)
        let spans: Vec<(Instant, Instant)> = std::thread::scope(|s| {
            let workers: Vec<_> = buf
                .chunks(part)
                .map(|chunk| {
                    let start_line = &start_line;
                    s.spawn(move || {
                        start_line.wait();
                        let start = Instant::now();
                        black_box(sum_words(chunk));
                        (start, Instant::now())
                    })
                })
                .collect();
            workers.into_iter().filter_map(|w| w.join().ok()).collect()
        });
        let first = spans.iter().map(|s| s.0).min();
        let last = spans.iter().map(|s| s.1).max();
        if let (Some(first), Some(last)) = (first, last) {
            best = best.min((last - first).as_secs_f64());
        }
    }
    Bandwidth {
        bytes: words * 8,
        threads,
        best_secs: best.max(1e-9),
    }
}

/// Sums with eight independent accumulators, which the compiler turns into
/// wide vector loads: the loop is bound by memory, not by additions.
fn sum_words(words: &[u64]) -> u64 {
    let words = black_box(words);
    let mut acc = [0u64; 8];
    let mut lines = words.chunks_exact(8);
    for line in &mut lines {
        for (a, w) in acc.iter_mut().zip(line) {
            *a = a.wrapping_add(*w);
        }
    }
    lines
        .remainder()
        .iter()
        .chain(acc.iter())
        .fold(0u64, |t, w| t.wrapping_add(*w))
}

/// Physical cores this process may run on: distinct (package, core) pairs
/// in `/proc/cpuinfo` (hyper-threads share a core and its memory
/// bandwidth, so like `llama-bench` we default to cores, not logical CPUs),
/// capped by [`std::thread::available_parallelism`], which honours CPU
/// affinity and cgroup quotas. Elsewhere, or if cpuinfo says nothing, the
/// logical CPU count.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| cores_in_cpuinfo(&text))
        .map_or(logical, |cores| cores.min(logical))
        .max(1)
}

/// Distinct (`physical id`, `core id`) pairs; `None` if there are none
/// (some virtual machines and architectures omit the fields).
fn cores_in_cpuinfo(text: &str) -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    for block in text.split("\n\n") {
        let field = |name: &str| {
            block.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_string())
            })
        };
        if let Some(core) = field("core id") {
            cores.insert((field("physical id").unwrap_or_default(), core));
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// Makes candle's CPU backend use `threads` threads; returns the count
/// candle reports afterwards. Call it before loading a model and before
/// starting other threads (it sets environment variables).
///
/// What it controls, in candle-core 0.11.1 (`src/utils.rs`,
/// `src/cpu_backend/mod.rs`):
/// - matmuls call `gemm` with `Parallelism::Rayon(get_num_threads())`, and
///   `get_num_threads` reads `RAYON_NUM_THREADS` at every call. `gemm` runs
///   those tasks on the current rayon pool, so the global pool is built here
///   with the same count (`init_global_threadpool`). Products with a single
///   row — every projection of a one-token decode step — take `gemm`'s
///   `gemv` path, which is single-threaded whatever this says.
/// - element-wise ops over 64 Ki elements or more run on candle's own
///   spinning barrier pool, sized once from `CANDLE_NUM_THREADS` (falling
///   back to `RAYON_NUM_THREADS`).
/// - `Device::with_context` installs a private rayon pool of
///   `get_num_threads()` threads; softmax and RMSNorm in candle-nn use
///   whichever rayon pool is current.
pub fn set_cpu_threads(threads: usize) -> usize {
    let n = threads.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
    candle_core::utils::init_global_threadpool();
    candle_core::utils::get_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_stddev() {
        assert_eq!(mean(&[]), 0.0);
        assert_eq!(stddev(&[]), 0.0);
        assert_eq!(stddev(&[5.0]), 0.0);
        assert_eq!(mean(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]), 5.0);
        // Population sd of this set is 2; the sample sd is sqrt(32 / 7).
        let sd = stddev(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert!((sd - (32.0f64 / 7.0).sqrt()).abs() < 1e-12, "{sd}");
        assert_eq!(stddev(&[3.0, 3.0, 3.0]), 0.0);
        assert!((stddev(&[1.0, 2.0]) - 0.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn measurement_averages_rates_not_times() {
        let m = Measurement {
            test: Test {
                n_prompt: 0,
                n_gen: 10,
                n_depth: 0,
            },
            samples: vec![
                Sample {
                    secs: 1.0,
                    tokens_per_sec: 10.0,
                },
                Sample {
                    secs: 0.5,
                    tokens_per_sec: 20.0,
                },
            ],
        };
        assert_eq!(m.mean_tps(), 15.0);
        assert!((m.stddev_tps() - 50f64.sqrt()).abs() < 1e-12);
    }

    fn t(n_prompt: usize, n_gen: usize, n_depth: usize) -> Test {
        Test {
            n_prompt,
            n_gen,
            n_depth,
        }
    }

    #[test]
    fn lists_expand_to_rows_in_llama_bench_order() -> Result<()> {
        let rows = expand_tests(&[128, 512], &[32, 128], &[0, 1024])?;
        assert_eq!(
            rows,
            vec![
                t(128, 0, 0),
                t(512, 0, 0),
                t(0, 32, 0),
                t(0, 128, 0),
                t(128, 0, 1024),
                t(512, 0, 1024),
                t(0, 32, 1024),
                t(0, 128, 1024),
            ]
        );
        let names: Vec<_> = rows.iter().map(Test::name).collect();
        assert_eq!(names[0], "pp128");
        assert_eq!(names[3], "tg128");
        assert_eq!(names[6], "tg32 @ d1024");
        Ok(())
    }

    #[test]
    fn zero_lengths_skip_their_rows() -> Result<()> {
        assert_eq!(expand_tests(&[0], &[16], &[0])?, vec![t(0, 16, 0)]);
        assert_eq!(expand_tests(&[64], &[0], &[0])?, vec![t(64, 0, 0)]);
        assert_eq!(
            expand_tests(&[0, 8], &[0, 4], &[2])?,
            vec![t(8, 0, 2), t(0, 4, 2)]
        );
        assert!(expand_tests(&[0], &[0], &[0]).is_err());
        assert!(expand_tests(&[8], &[8], &[]).is_err());
        Ok(())
    }

    #[test]
    fn test_sizes() {
        let pp = t(512, 0, 100);
        assert_eq!((pp.timed_tokens(), pp.context()), (512, 612));
        assert!(!pp.is_generation());
        let tg = t(0, 32, 0);
        assert_eq!((tg.timed_tokens(), tg.context()), (32, 32));
        assert!(tg.is_generation());
    }

    #[test]
    fn cpuinfo_counts_cores_not_hyperthreads() {
        let block = |cpu: usize, pkg: usize, core: usize| {
            format!(
                "processor\t: {cpu}\nphysical id\t: {pkg}\ncore id\t\t: {core}\nflags\t\t: fpu\n"
            )
        };
        let two_by_two = [
            block(0, 0, 0),
            block(1, 0, 1),
            block(2, 0, 0),
            block(3, 0, 1),
        ];
        assert_eq!(cores_in_cpuinfo(&two_by_two.join("\n")), Some(2));
        let two_packages = [block(0, 0, 0), block(1, 1, 0)];
        assert_eq!(cores_in_cpuinfo(&two_packages.join("\n")), Some(2));
        assert_eq!(cores_in_cpuinfo("processor\t: 0\nflags\t: fpu\n"), None);
        assert!(physical_cores() >= 1);
    }

    #[test]
    fn bandwidth_reads_the_whole_buffer() {
        let bw = memory_read_bandwidth(1 << 20, 2, 2);
        assert_eq!(bw.bytes, 1 << 20);
        assert_eq!(bw.threads, 2);
        assert!(bw.gb_per_sec() > 0.0);
        assert!((bw.bound_tps(1 << 20) - 1.0 / bw.best_secs).abs() < 1e-6 / bw.best_secs);
        assert_eq!(sum_words(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), 55);
    }
}
