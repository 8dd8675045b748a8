//! `taper bench`: `llama-bench`'s flags and report over [`taper::bench`];
//! `taper bench serve`: a load test of a running server over
//! [`taper::bench_serve`].
//!
//! Flags become a list of tests (one row each), the CPU thread count is
//! fixed before the model loads, the memory bandwidth is measured on the
//! CPU, and the rows go to stdout as a Markdown table, JSON or CSV. Progress
//! and the load summary go to stderr, so stdout is only the report.

use std::path::Path;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use taper::bench::{self, Bandwidth, Measurement, Runner};
use taper::bench_serve::{self, ServeBench};
use taper::device::DeviceSpec;
use taper::quant::Quant;

use super::ModelArgs;

/// `taper bench [FLAGS]` (a model's speed) or `taper bench serve [FLAGS]`
/// (a server's).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchCli {
    #[command(subcommand)]
    command: Option<BenchCommand>,

    /// Absent with `serve`. (Only a struct without flattened fields can be
    /// an optional flatten: clap leaves nested groups empty.)
    #[command(flatten)]
    model: Option<ModelArgs>,

    #[command(flatten)]
    bench: BenchArgs,
}

/// Flags of `taper bench` besides the model's.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Prompt lengths, comma-separated: one `ppN` row each (one forward
    /// pass over N tokens); 0 skips prompt rows.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    n_prompt: Vec<usize>,

    /// Generation lengths, comma-separated: one `tgN` row each (N one-token
    /// decode steps); 0 skips generation rows.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_gen: Vec<usize>,

    /// Context depths, comma-separated: tokens put in the cache (untimed)
    /// before each test.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    n_depth: Vec<usize>,

    /// Timed repetitions of each test, after one warm-up run.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    repetitions: usize,

    /// Report format on stdout.
    #[arg(short = 'o', long = "output", value_enum, default_value = "md")]
    output: Format,

    /// MiB streamed to measure memory bandwidth (much more than the L3);
    /// 0 skips the measurement.
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,

    /// Skip the warm-up run.
    #[arg(long)]
    no_warmup: bool,

    /// Seed of the random token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Load-test a running server over HTTP (vLLM's benchmark_serving
    /// method): concurrent streaming clients, requests/s, output tokens/s,
    /// TTFT and inter-token latency percentiles.
    Serve(ServeBenchArgs),
}

/// Flags of `taper bench serve`.
#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,

    /// The model name to request [default: the first /v1/models lists].
    #[arg(long)]
    model: Option<String>,

    /// Clients streaming at once.
    #[arg(short = 'c', long, default_value_t = 1)]
    concurrency: usize,

    /// Requests to complete (timed).
    #[arg(long, default_value_t = 16)]
    requests: usize,

    /// Random prompt tokens per request (after the shared prefix).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,

    /// Tokens every prompt starts with, the same in all requests (a system
    /// prompt), to measure prefix caching.
    #[arg(long, default_value_t = 0)]
    shared_prefix_tokens: usize,

    /// Tokens generated per request (with ignore_eos).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,

    /// Untimed requests sent first, one at a time.
    #[arg(long, default_value_t = 1)]
    warmup: usize,

    /// Prompt token ids are drawn below this id (keep it under the
    /// model's vocabulary size).
    #[arg(long, default_value_t = 10_000)]
    max_token_id: u32,

    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "TAPER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Seconds one request may take.
    #[arg(long, default_value_t = 600)]
    timeout: u64,

    /// Report format on stdout.
    #[arg(short = 'o', long = "output", value_enum, default_value = "md")]
    output: ServeFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServeFormat {
    Md,
    Json,
}

fn run_serve(args: ServeBenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 {
        bail!("`-c/--concurrency` must be >= 1. Given: 0");
    }
    if args.requests == 0 {
        bail!("`--requests` must be >= 1. Given: 0");
    }
    if args.prompt_tokens + args.shared_prefix_tokens == 0 {
        bail!("`--prompt-tokens` plus `--shared-prefix-tokens` must be >= 1. Given: 0");
    }
    let bench = ServeBench {
        url: args.url,
        model: args.model,
        concurrency: args.concurrency,
        requests: args.requests,
        warmup: args.warmup,
        prompt_tokens: args.prompt_tokens,
        shared_prefix_tokens: args.shared_prefix_tokens,
        max_tokens: args.max_tokens,
        max_token_id: args.max_token_id,
        seed: args.seed,
        api_key: args.api_key,
        timeout: std::time::Duration::from_secs(args.timeout),
    };
    eprintln!(
        "{} requests, {} at once, {} prompt tokens ({} shared), {} new tokens each, against {}",
        bench.requests,
        bench.concurrency,
        bench.prompt_tokens + bench.shared_prefix_tokens,
        bench.shared_prefix_tokens,
        bench.max_tokens,
        bench.url
    );
    let report = bench_serve::run(&bench)?;
    let out = match args.output {
        ServeFormat::Md => bench_serve::markdown(&report),
        ServeFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
    };
    print!("{out}");
    if report.completed == 0 {
        bail!(
            "every request failed: {}",
            report.first_error.unwrap_or_default()
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Md,
    Json,
    Csv,
}

/// Bandwidth measurements keep the fastest of this many runs (one run of
/// 1 GiB takes tens of milliseconds; on a shared machine the best run is
/// the one least disturbed).
const BANDWIDTH_RUNS: usize = 10;

pub fn run(cli: BenchCli) -> anyhow::Result<()> {
    match (cli.command, cli.model) {
        (Some(BenchCommand::Serve(serve)), _) => run_serve(serve),
        (None, Some(model)) => run_model(model, cli.bench),
        (None, None) => bail!("`taper bench` needs --model MODEL (or `taper bench serve`)"),
    }
}

fn run_model(model_args: ModelArgs, args: BenchArgs) -> anyhow::Result<()> {
    if args.repetitions == 0 {
        bail!("`-r/--repetitions` must be >= 1. Given: 0");
    }
    let tests = bench::expand_tests(&args.n_prompt, &args.n_gen, &args.n_depth)?;
    // Before anything starts candle's thread pools.
    let threads = model_args.apply_threads()?;

    let on_cpu = model_args.device.parse::<DeviceSpec>()? == DeviceSpec::Cpu;
    let quant = model_args.quant.parse::<Quant>()?;
    // Measured before loading, so the buffer and the weights are never
    // resident together.
    let bandwidth = (on_cpu && args.bandwidth_mib > 0).then(|| {
        eprintln!(
            "measuring memory read bandwidth ({} MiB, {threads} threads)",
            args.bandwidth_mib
        );
        bench::memory_read_bandwidth(args.bandwidth_mib << 20, threads, BANDWIDTH_RUNS)
    });

    let pipeline = model_args.load()?;
    let model = &pipeline.model;
    let max = model.config().max_position_embeddings;
    if let Some(t) = tests.iter().find(|t| t.context() > max) {
        bail!(
            "{} needs {} positions (-d + -p + -n) but the model's context is {max} (max_position_embeddings)",
            t.name(),
            t.context()
        );
    }

    let mut runner = Runner::new(model, args.seed, !args.no_warmup);
    let mut results = Vec::with_capacity(tests.len());
    for test in &tests {
        eprintln!("running {} ({} repetitions)", test.name(), args.repetitions);
        results.push(runner.measure(test, args.repetitions)?);
    }

    let device = model.device();
    let backend = if device.is_cuda() {
        "CUDA"
    } else if device.is_metal() {
        "Metal"
    } else {
        "CPU"
    };
    let info = ModelInfo {
        model: model_args.model.clone(),
        name: short_name(&model_args.model),
        architecture: model.config().architecture.class_name().to_string(),
        size_bytes: model.weight_bytes(),
        n_params: model.num_parameters(),
        dtype: model.weight_dtype().as_str().to_string(),
        quant: (quant != Quant::None).then(|| quant.to_string()),
        device: model_args.device.clone(),
        backend: backend.to_string(),
        threads,
        bytes_per_token: bench::weight_bytes_per_token(model),
        bandwidth,
    };
    let rows: Vec<Row> = results.iter().map(|m| Row::new(&info, m)).collect();
    let out = match args.output {
        Format::Md => markdown(&info, &rows),
        Format::Json => serde_json::to_string_pretty(&rows)? + "\n",
        Format::Csv => csv(&rows),
    };
    print!("{out}");
    Ok(())
}

/// What every row repeats about the model and the machine.
struct ModelInfo {
    model: String,
    name: String,
    architecture: String,
    size_bytes: usize,
    n_params: usize,
    dtype: String,
    quant: Option<String>,
    device: String,
    backend: String,
    threads: usize,
    bytes_per_token: usize,
    bandwidth: Option<Bandwidth>,
}

/// One test's results, as JSON and CSV carry them.
#[derive(Debug, Serialize)]
struct Row {
    model: String,
    architecture: String,
    size_bytes: usize,
    n_params: usize,
    /// The runtime dtype: activations, and weights unless quantized.
    dtype: String,
    /// The linear projections' quantization (`q8_0`), if any.
    quant: Option<String>,
    device: String,
    backend: String,
    threads: usize,
    test: String,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    repetitions: usize,
    mean_ts: f64,
    stddev_ts: f64,
    samples_s: Vec<f64>,
    samples_ts: Vec<f64>,
    /// Streaming-read bandwidth with `threads` threads (CPU only).
    memory_bandwidth_gbs: Option<f64>,
    /// Weight bytes one decode step reads.
    weight_bytes_per_token: usize,
    /// Decode speed the bandwidth allows (generation rows only).
    bound_ts: Option<f64>,
    /// `mean_ts / bound_ts`.
    bound_share: Option<f64>,
}

impl Row {
    fn new(info: &ModelInfo, m: &Measurement) -> Row {
        let mean_ts = m.mean_tps();
        let bound_ts = info
            .bandwidth
            .filter(|_| m.test.is_generation())
            .map(|bw| bw.bound_tps(info.bytes_per_token));
        Row {
            model: info.model.clone(),
            architecture: info.architecture.clone(),
            size_bytes: info.size_bytes,
            n_params: info.n_params,
            dtype: info.dtype.clone(),
            quant: info.quant.clone(),
            device: info.device.clone(),
            backend: info.backend.clone(),
            threads: info.threads,
            test: m.test.name(),
            n_prompt: m.test.n_prompt,
            n_gen: m.test.n_gen,
            n_depth: m.test.n_depth,
            repetitions: m.samples.len(),
            mean_ts,
            stddev_ts: m.stddev_tps(),
            samples_s: m.samples.iter().map(|s| s.secs).collect(),
            samples_ts: m.samples.iter().map(|s| s.tokens_per_sec).collect(),
            memory_bandwidth_gbs: info.bandwidth.map(|bw| bw.gb_per_sec()),
            weight_bytes_per_token: info.bytes_per_token,
            bound_ts,
            bound_share: bound_ts.map(|b| mean_ts / b),
        }
    }
}

/// The folder or repo name, for the table.
fn short_name(model: &str) -> String {
    Path::new(model.trim_end_matches('/'))
        .file_name()
        .map_or_else(|| model.to_string(), |n| n.to_string_lossy().into_owned())
}

fn human_bytes(n: usize) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let n = n as f64;
    if n >= GIB {
        format!("{:.2} GiB", n / GIB)
    } else {
        format!("{:.2} MiB", n / MIB)
    }
}

fn human_count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else {
        format!("{:.2} K", n / 1e3)
    }
}

/// `llama-bench`'s table, plus the bandwidth bound of generation rows.
fn markdown(info: &ModelInfo, rows: &[Row]) -> String {
    let mut out = String::new();
    if let Some(bw) = info.bandwidth {
        out += &format!(
            "memory read bandwidth: {:.1} GB/s ({} MiB streamed by {} thread{}, best of {BANDWIDTH_RUNS}); \
             a decode step reads {:.1} MB of weights, so tg is bound by {:.2} t/s\n\n",
            bw.gb_per_sec(),
            bw.bytes >> 20,
            bw.threads,
            if bw.threads == 1 { "" } else { "s" },
            info.bytes_per_token as f64 / 1e6,
            bw.bound_tps(info.bytes_per_token),
        );
    }
    let header = [
        "model",
        "size",
        "params",
        "backend",
        "threads",
        "dtype/quant",
        "test",
        "t/s",
        "bound t/s",
        "of bound",
    ];
    // Text columns left-aligned, numbers right-aligned.
    let right = [
        false, true, true, false, true, false, true, true, true, true,
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                info.name.clone(),
                human_bytes(r.size_bytes),
                human_count(r.n_params),
                r.backend.clone(),
                r.threads.to_string(),
                r.quant.clone().unwrap_or_else(|| r.dtype.clone()),
                r.test.clone(),
                format!("{:.2} ± {:.2}", r.mean_ts, r.stddev_ts),
                r.bound_ts.map_or("-".into(), |b| format!("{b:.2}")),
                r.bound_share
                    .map_or("-".into(), |s| format!("{:.0}%", 100.0 * s)),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([header[i].len(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect();
    let line = |fields: Vec<String>| {
        let padded: Vec<String> = fields
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((f, &w), r)| {
                if r {
                    format!("{f:>w$}")
                } else {
                    format!("{f:<w$}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    out += &line(header.iter().map(|h| h.to_string()).collect());
    out += &line(
        widths
            .iter()
            .zip(right)
            .map(|(&w, r)| {
                if r {
                    format!("{}:", "-".repeat(w - 1))
                } else {
                    "-".repeat(w)
                }
            })
            .collect(),
    );
    for row in cells {
        out += &line(row);
    }
    out
}

/// One header line and one line per row; samples are `;`-separated.
fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "model,architecture,size_bytes,n_params,dtype,quant,device,backend,threads,test,n_prompt,n_gen,n_depth,\
         repetitions,mean_ts,stddev_ts,samples_s,samples_ts,memory_bandwidth_gbs,weight_bytes_per_token,\
         bound_ts,bound_share\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    let list = |v: &[f64]| v.iter().map(f64::to_string).collect::<Vec<_>>().join(";");
    for r in rows {
        let fields = [
            csv_field(&r.model),
            csv_field(&r.architecture),
            r.size_bytes.to_string(),
            r.n_params.to_string(),
            csv_field(&r.dtype),
            csv_field(r.quant.as_deref().unwrap_or("")),
            csv_field(&r.device),
            csv_field(&r.backend),
            r.threads.to_string(),
            csv_field(&r.test),
            r.n_prompt.to_string(),
            r.n_gen.to_string(),
            r.n_depth.to_string(),
            r.repetitions.to_string(),
            r.mean_ts.to_string(),
            r.stddev_ts.to_string(),
            list(&r.samples_s),
            list(&r.samples_ts),
            opt(r.memory_bandwidth_gbs),
            r.weight_bytes_per_token.to_string(),
            opt(r.bound_ts),
            opt(r.bound_share),
        ];
        out += &fields.join(",");
        out.push('\n');
    }
    out
}

/// RFC 4180: quote a field holding a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("qwen2"), "qwen2");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn names_and_sizes_read_like_llama_bench() {
        assert_eq!(
            short_name("target/bench-models/qwen2.5-0.5b/"),
            "qwen2.5-0.5b"
        );
        assert_eq!(short_name("Qwen/Qwen2.5-0.5B"), "Qwen2.5-0.5B");
        assert_eq!(human_bytes(988_097_824), "942.32 MiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
        assert_eq!(human_count(494_032_768), "494.03 M");
    }
}
