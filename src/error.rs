//! The library's one error type.
//!
//! Every variant names what the user has to look at: the file, the tensor, the
//! field or the repository. The binary prints these with `{:#}` through
//! `anyhow`; nothing in the library panics on input a user or a file controls.

use std::path::PathBuf;

/// Errors from loading and running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- model source / Hub -------------------------------------------------
    /// `--model` was neither an existing folder nor a well-formed repo id.
    #[error("'{0}' is neither a local folder nor a Hub repo id of the form 'org/name'")]
    BadModelId(String),

    /// `--revision` is empty or could not name a branch, tag or commit.
    #[error("'{0}' is not a valid revision: give a branch, a tag or a commit hash")]
    BadRevision(String),

    /// `--model` names a `.gguf` file that does not exist.
    #[error("the GGUF file {0} does not exist (for a Hub repo, give --model org/name --gguf-file FILE.gguf)")]
    NoSuchGguf(PathBuf),

    /// `--model` names a `.gguf` path that exists but is not a regular file
    /// (a folder, a device, a pipe, a symlink to one of those).
    #[error("{path} is not a regular file ({kind}); give --model a .gguf file")]
    NotAFile { path: PathBuf, kind: String },

    /// A folder without config.json holds GGUF files: `--gguf-file` picks one.
    #[error("{dir} has no config.json but holds GGUF files ({files}): choose one with --gguf-file NAME.gguf")]
    GgufOnlyFolder { dir: PathBuf, files: String },

    /// `--gguf-file` does not name a single `.gguf` file inside the model.
    #[error("--gguf-file '{name}': {message}")]
    BadGgufFile { name: String, message: String },

    /// A required file is absent from a local model folder.
    #[error("{file} is missing from the model folder {dir}")]
    MissingFile { dir: PathBuf, file: String },

    /// The Hub answered 401/403: the repo is gated or private.
    #[error("access to {repo} was refused by the Hub ({status}): the repo is gated or private; set HF_TOKEN or run `huggingface-cli login` with an account that has access")]
    HubUnauthorized { repo: String, status: u16 },

    /// The Hub answered 404 for the repo, the revision or a file.
    #[error("{what} was not found on the Hub ({url})")]
    HubNotFound { what: String, url: String },

    /// Offline mode, and the file is not in the cache.
    #[error("HF_HUB_OFFLINE is set and {file} of {repo} (revision {revision}) is not in the Hub cache at {cache}")]
    OfflineNotCached {
        repo: String,
        revision: String,
        file: String,
        cache: PathBuf,
    },

    /// Any other failure talking to the Hub.
    #[error("downloading {file} from {repo}: {message}")]
    Hub {
        repo: String,
        file: String,
        message: String,
    },

    // ---- files ---------------------------------------------------------------
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file did not parse, or lacks a field.
    #[error("parsing {path}: {message}")]
    Json { path: PathBuf, message: String },

    /// A config field is missing or out of range.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    /// `architectures` names a model taper does not implement.
    #[error("unsupported architecture '{found}' in {path}; taper supports: {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: String,
    },

    // ---- weights -------------------------------------------------------------
    /// A safetensors file is truncated, corrupt or not safetensors at all.
    #[error("{path} is not a valid safetensors file: {message}")]
    CorruptWeights { path: PathBuf, message: String },

    /// A GGUF file is truncated, corrupt or not GGUF at all.
    #[error("{path} is not a valid GGUF file: {message}")]
    CorruptGguf { path: PathBuf, message: String },

    /// A GGUF tensor is stored in a type taper cannot load.
    #[error("tensor '{name}' in {path} is stored as {dtype}, which taper cannot load (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K)")]
    GgufTensorType {
        name: String,
        path: PathBuf,
        dtype: String,
    },

    /// A tensor the architecture needs is in none of the weight files.
    #[error("tensor '{name}' is missing from the weights ({files})")]
    MissingTensor { name: String, files: String },

    /// A tensor has a different shape from the one the config implies.
    #[error(
        "tensor '{name}' in {path} has shape {found:?}, expected {expected:?} from the model's config"
    )]
    TensorShape {
        name: String,
        path: PathBuf,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    /// Quantized weight bytes that do not fit their format or shape (a
    /// length, or a row that is not whole blocks).
    #[error("quantized weights: {0}")]
    Quant(String),

    /// A tensor has a dtype taper cannot load.
    #[error("tensor '{name}' in {path} has dtype {dtype}, which taper cannot load (expected F32, F16 or BF16)")]
    TensorDtype {
        name: String,
        path: PathBuf,
        dtype: String,
    },

    // ---- devices and runtime -------------------------------------------------
    /// A device or dtype the build or the machine cannot provide.
    #[error("{0}")]
    Device(String),

    /// A request the model cannot serve (e.g. longer than its context).
    #[error("{0}")]
    InvalidRequest(String),

    /// The logits could not be sampled from: NaN or `+inf` (a numerical
    /// failure upstream), every token masked, or an empty row.
    #[error("cannot sample the next token: {0}")]
    Sampling(String),

    // ---- chat templates --------------------------------------------------------
    /// A chat template does not compile.
    #[error("chat template {origin}: syntax error{}: {message}", at_line(*.line))]
    ChatTemplateSyntax {
        origin: String,
        line: Option<usize>,
        message: String,
    },

    /// The chat template called `raise_exception`: it refuses this
    /// conversation (e.g. roles that do not alternate), so the request is at fault.
    #[error("the chat template rejected the conversation: {message}")]
    ChatTemplateRaised { message: String },

    /// Rendering a chat template failed (a runtime error in the template, or it
    /// ran out of its work budget).
    #[error("rendering chat template {origin}{}: {message}", at_line(*.line))]
    ChatTemplateRender {
        origin: String,
        line: Option<usize>,
        message: String,
    },

    /// A structured-output constraint cannot be compiled or followed.
    #[error(transparent)]
    Constraint(#[from] crate::constraint::ConstraintError),

    /// The prompt and the tokens asked for do not fit the context.
    #[error("{0}")]
    ContextLength(String),

    /// Too many requests are running or queued.
    #[error("{0}")]
    Overloaded(String),

    /// The model loaded but a few test tokens give non-finite logits: its
    /// weights or config values are broken, and every request would fail.
    #[error("the model loads but does not compute: {0}")]
    DoesNotCompute(String),

    /// A failure inside candle while computing.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// An HTTP exchange with a server failed (`taper bench serve`).
    #[error("{url}: {message}")]
    Http { url: String, message: String },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// " at line N" when the line is known, for template errors.
fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
