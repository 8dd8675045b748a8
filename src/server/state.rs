//! What every handler shares: the server's settings, the metrics, and —
//! once the model has loaded on its own thread — the engine handle with the
//! defaults requests start from. Until then [`AppState::ready`] answers 503.

use std::sync::{Arc, OnceLock};

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
}

impl ServerConfig {
    pub fn new(served_model_name: impl Into<String>) -> Self {
        ServerConfig {
            served_model_name: served_model_name.into(),
            api_key: None,
            cors_allow_origins: Vec::new(),
            body_limit: DEFAULT_BODY_LIMIT,
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
}

impl Ready {
    pub fn new(engine: EngineHandle, defaults: Defaults) -> Self {
        Ready {
            engine,
            defaults,
            created: unix_now(),
        }
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        self.engine.pipeline()
    }
}

struct Inner {
    config: ServerConfig,
    metrics: Arc<Metrics>,
    ready: OnceLock<Arc<Ready>>,
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
        }))
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
