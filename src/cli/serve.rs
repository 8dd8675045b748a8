//! `taper serve`: the OpenAI-compatible HTTP server and its chat page.
//! Binds at once and says where (`listening on http://HOST:PORT`, the real
//! port when `--port 0`), loads the model on its own thread while `/health`
//! answers 503, then serves until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::net::TcpListener;

use taper::engine::{EngineHandle, EngineLimits};
use taper::metrics::Metrics;
use taper::pipeline::Pipeline;
use taper::server::{self, AppState, Defaults, Ready, ServerConfig};

use super::{ModelArgs, SamplingArgs};

/// Flags of `taper serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,

    /// Server-wide sampling defaults; requests override them.
    #[command(flatten)]
    sampling: SamplingArgs,

    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to listen on (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,

    /// The model name clients use [default: the repo id, or the name of
    /// the model's folder or .gguf file].
    #[arg(long)]
    served_model_name: Option<String>,

    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "TAPER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Allow browser requests from this origin (repeatable; `*` for any).
    #[arg(long)]
    cors_allow_origin: Vec<String>,

    /// Sequences decoded together in one forward pass.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,

    /// Requests that may wait for the batch; beyond that the server answers 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,

    /// Tokens one forward pass computes at most: each running decode takes
    /// one, then prompts are computed in chunks up to this total, so a long
    /// prompt does not stall the streams already running.
    #[arg(long, default_value_t = 512)]
    max_batched_tokens: usize,

    /// Memory for the KV cache: a size such as 512MiB, 4GiB or 1.5G (a bare
    /// number is MiB) [default: what --max-batch sequences of the full
    /// context need, at most 25% of the memory available].
    #[arg(long, value_parser = parse_mem_size)]
    kv_cache_mem: Option<usize>,

    /// Keep no KV of finished requests for later ones sharing their prefix.
    #[arg(long)]
    no_prefix_cache: bool,

    /// Do not serve the browser chat page at `/` (the API only).
    #[arg(long)]
    no_webui: bool,

    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM; then
    /// streams end with an error event and `[DONE]`, other requests get 503.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if args.max_batched_tokens == 0 {
        bail!("--max-batched-tokens must be at least 1");
    }
    for origin in &args.cors_allow_origin {
        let ok = origin == "*"
            || ((origin.starts_with("http://") || origin.starts_with("https://"))
                && axum::http::HeaderValue::from_str(origin).is_ok());
        if !ok {
            bail!(
                "--cors-allow-origin '{origin}' must be `*` or an origin like https://example.com"
            );
        }
    }
    if args.api_key.as_deref().is_some_and(str::is_empty) {
        bail!("--api-key (or TAPER_API_KEY) is empty");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    eprintln!("listening on http://{addr}");
    if !args.no_webui {
        eprintln!("chat page: http://{addr}/");
    }

    let mut config = ServerConfig::new(
        args.served_model_name
            .clone()
            .unwrap_or_else(|| default_model_name(&args.model.model)),
    );
    config.api_key = args.api_key.clone();
    config.cors_allow_origins = args.cors_allow_origin.clone();
    config.webui = !args.no_webui;
    if addr.ip().is_loopback() {
        config.allowed_hosts = Some(server::loopback_hosts(&args.host));
    }
    let metrics = Arc::new(Metrics::default());
    let state = AppState::new(config, metrics.clone());

    // Load on a plain thread: a runtime's blocking pool would hold the
    // process open on shutdown until loading finished.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let model = args.model.clone();
    std::thread::Builder::new()
        .name("taper-load".into())
        .spawn(move || {
            let _ = tx.send(model.load());
        })
        .context("starting the loading thread")?;
    let loader = {
        let state = state.clone();
        let limits = EngineLimits {
            max_batch: args.max_batch,
            max_batched_tokens: args.max_batched_tokens,
            kv_cache_bytes: args.kv_cache_mem,
            prefix_cache: !args.no_prefix_cache,
            ..EngineLimits::default()
        };
        async move {
            let pipeline = rx.await.context("the loading thread died")??;
            let defaults = defaults(&args.sampling, &pipeline)?;
            let context = pipeline.context_len();
            let pipeline = Arc::new(pipeline);
            // The token table for structured output takes about a second
            // for a 150k vocabulary: built now, beside serving, rather than
            // by the first request that asks for it.
            let warm = pipeline.clone();
            std::thread::spawn(move || {
                if let Err(e) = warm.token_table() {
                    tracing::warn!("{e}");
                }
            });
            let engine = EngineHandle::spawn(pipeline, limits, args.max_queue, metrics)?;
            let kv = engine.kv_budget();
            if kv.total_blocks == 0 {
                bail!(
                    "--kv-cache-mem holds no KV block: one block of {} positions takes {} bytes for this model",
                    kv.block_size,
                    kv.bytes_per_block
                );
            }
            eprintln!(
                "KV cache: {} MiB, {} blocks of {} positions ({} positions)",
                kv.bytes() >> 20,
                kv.total_blocks,
                kv.block_size,
                kv.positions()
            );
            if kv.positions() < context {
                eprintln!(
                    "warning: the KV cache holds {} positions, fewer than the model's context ({context}): \
                     requests are limited to {} tokens (prompt and max_tokens; /v1/models says so), \
                     raise --kv-cache-mem for the full context",
                    kv.positions(),
                    kv.positions()
                );
            }
            let capacity = args.max_batch.saturating_add(args.max_queue);
            state.set_ready(Ready::new(engine, defaults).with_capacity(capacity));
            eprintln!("ready: serving {}", state.config().served_model_name);
            std::future::pending::<anyhow::Result<()>>().await
        }
    };
    let grace = Duration::from_secs(args.shutdown_timeout);
    let stop = {
        let state = state.clone();
        move || state.stop_in_flight()
    };
    tokio::select! {
        result = server::listen::serve(listener, server::router(state), grace, stop) => {
            result.context("serving")
        }
        result = loader => result,
    }
}

/// The name a model is served under when `--served-model-name` is not
/// given: a Hub repo id as given, a local folder's or file's own name. Not
/// the path: it is shown to every client (`/v1/models`, error messages),
/// and clients type it.
fn default_model_name(model: &str) -> String {
    let path = std::path::Path::new(model);
    if !path.exists() {
        return model.to_owned();
    }
    // `.`, `..` or `dir/` name their folder only once resolved.
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.to_owned())
}

/// generation_config.json's defaults under the command line's flags.
fn defaults(flags: &SamplingArgs, pipeline: &Pipeline) -> anyhow::Result<Defaults> {
    let mut d = Defaults::from_pipeline(pipeline);
    d.sampling = flags.params(pipeline)?;
    if flags.max_tokens.is_some() {
        d.max_tokens = flags.max_tokens;
    }
    d.stop = flags.stop.clone();
    d.ignore_eos = flags.ignore_eos;
    Ok(d)
}

/// `--kv-cache-mem`: bytes from `512MiB`, `4GiB`, `1.5G`, `800M`, `2048`
/// (MiB).
fn parse_mem_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 512MiB or 4GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => (1u64 << 20) as f64,
        "g" | "gb" | "gib" => (1u64 << 30) as f64,
        "k" | "kb" | "kib" => 1024.0,
        _ => return Err(format!("`{s}`: the unit must be KiB, MiB or GiB")),
    };
    let bytes = value * scale;
    if bytes < 1.0 {
        return Err(format!("`{s}` must be more than zero"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::{default_model_name, parse_mem_size};

    #[test]
    fn models_are_named_by_their_repo_folder_or_file() {
        assert_eq!(
            default_model_name("Qwen/Qwen2.5-0.5B-Instruct"),
            "Qwen/Qwen2.5-0.5B-Instruct"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("my-model");
        std::fs::create_dir(&model).expect("mkdir");
        std::fs::write(model.join("m.Q8_0.gguf"), b"").expect("write");
        assert_eq!(default_model_name(&model.display().to_string()), "my-model");
        assert_eq!(
            default_model_name(&format!("{}/", model.display())),
            "my-model"
        );
        assert_eq!(
            default_model_name(&format!("{}/.", model.display())),
            "my-model"
        );
        let file = model.join("m.Q8_0.gguf");
        assert_eq!(
            default_model_name(&file.display().to_string()),
            "m.Q8_0.gguf"
        );
    }

    #[test]
    fn memory_sizes_read_in_binary_units() {
        assert_eq!(parse_mem_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_mem_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_mem_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_mem_size("2048"), Ok(2048 << 20));
        assert_eq!(parse_mem_size("64 kb"), Ok(64 << 10));
        assert!(parse_mem_size("0").is_err());
        assert!(parse_mem_size("lots").is_err());
        assert!(parse_mem_size("3TB").is_err());
    }
}
