//! What every handler shares: the server's settings, the metrics, and —
//! once the model has loaded on its own thread — the engine handle with the
//! defaults requests start from. Until then [`AppState::ready`] answers 503.

use std::sync::{Arc, OnceLock};

use tokio::sync::{watch, Semaphore};

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::sampling::SamplingParams;

use super::error::AppError;
use super::response::unix_now;

/// Request bodies above this many bytes get 413.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// How the server presents itself; fixed at start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name `/v1/models` lists and requests must use.
    pub served_model_name: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_allow_origins: Vec<String>,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// The `Host` names (any port) requests must use; `None`: any. Set
    /// when the server listens on loopback only, so a page whose DNS name
    /// was rebound to 127.0.0.1 cannot reach it under its own name.
    pub allowed_hosts: Option<Vec<String>>,
    /// Serve the browser chat page at `/` (`--no-webui` turns it off).
    pub webui: bool,
}

impl ServerConfig {
    pub fn new(served_model_name: impl Into<String>) -> Self {
        ServerConfig {
            served_model_name: served_model_name.into(),
            api_key: None,
            cors_allow_origins: Vec::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            allowed_hosts: None,
            webui: true,
        }
    }
}

/// What a request leaves out: generation_config.json with the command
/// line's sampling flags on top.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub sampling: SamplingParams,
    /// New tokens when a request gives no `max_tokens` (clamped to what fits);
    /// `None`: everything that fits in the context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Defaults {
    /// generation_config.json's defaults, nothing else.
    pub fn from_pipeline(pipeline: &Pipeline) -> Self {
        Defaults {
            sampling: pipeline.default_sampling(),
            max_tokens: pipeline.generation.max_new_tokens,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// A loaded model behind its engine.
pub struct Ready {
    pub engine: EngineHandle,
    pub defaults: Defaults,
    /// When the model finished loading, for `/v1/models`.
    pub created: u64,
    /// The longest sequence this server can hold: the model's context, or
    /// less when the whole KV budget holds fewer positions. `/v1/models`
    /// advertises it and validation checks against it, so a prompt the
    /// cache can never hold is a 400 `context_length_exceeded`.
    pub context_len: usize,
    /// Requests the engine runs or queues at most (`--max-batch` +
    /// `--max-queue`; `None`: unknown): a request with more choices can
    /// never be served, so it is a 400 rather than a retryable 429.
    pub capacity: Option<usize>,
}

impl Ready {
    pub fn new(engine: EngineHandle, defaults: Defaults) -> Self {
        let context_len = engine
            .pipeline()
            .context_len()
            .min(engine.kv_budget().positions());
        Ready {
            engine,
            defaults,
            created: unix_now(),
            context_len,
            capacity: None,
        }
    }

    /// Sets [`capacity`](Self::capacity).
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        self.engine.pipeline()
    }

    /// Whether the KV budget, not the model, limits the context.
    pub fn kv_limited(&self) -> bool {
        self.context_len < self.pipeline().context_len()
    }
}

struct Inner {
    config: ServerConfig,
    metrics: Arc<Metrics>,
    ready: OnceLock<Arc<Ready>>,
    /// Set when the shutdown grace period runs out: requests still in
    /// flight end at once, each in a way its client can tell apart from a
    /// network fault.
    stop: watch::Sender<bool>,
    /// Requests validated (templated, tokenized) at once.
    validation_permits: Arc<Semaphore>,
}

/// Requests validated at once: the CPUs, at least 2 and at most 8 (each
/// may hold a template render's memory).
fn validation_slots() -> usize {
    std::thread::available_parallelism()
        .map_or(2, usize::from)
        .clamp(2, 8)
}

/// Fires when the server gives up on the requests in flight: its shutdown
/// grace period ran out. Streams then end with an error event and
/// `[DONE]`, and requests waiting for a whole answer get 503.
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// A signal that never fires.
    pub fn never() -> Self {
        let (_, rx) = watch::channel(false);
        StopSignal(rx)
    }

    /// Resolves once the signal fires (at once if it has); never, if the
    /// server that owns it is gone.
    pub async fn fired(mut self) {
        if self.0.wait_for(|&stop| stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The handlers' shared state; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// A server whose model is still loading.
    pub fn new(config: ServerConfig, metrics: Arc<Metrics>) -> Self {
        AppState(Arc::new(Inner {
            config,
            metrics,
            ready: OnceLock::new(),
            stop: watch::channel(false).0,
            validation_permits: Arc::new(Semaphore::new(validation_slots())),
        }))
    }

    /// What request validation takes a permit from (one per request being
    /// templated and tokenized).
    pub fn validation_permits(&self) -> &Arc<Semaphore> {
        &self.0.validation_permits
    }

    /// Ends every request in flight (see [`StopSignal`]).
    pub fn stop_in_flight(&self) {
        self.0.stop.send_replace(true);
    }

    /// What requests watch to end early at shutdown.
    pub fn stop_signal(&self) -> StopSignal {
        StopSignal(self.0.stop.subscribe())
    }

    /// Marks the model loaded. Returns `false` if it already was.
    pub fn set_ready(&self, ready: Ready) -> bool {
        self.0.ready.set(Arc::new(ready)).is_ok()
    }

    /// The loaded model, or 503 while it loads.
    pub fn ready(&self) -> Result<Arc<Ready>, AppError> {
        self.0.ready.get().cloned().ok_or_else(AppError::loading)
    }

    pub fn is_ready(&self) -> bool {
        self.0.ready.get().is_some()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.0.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }
}
