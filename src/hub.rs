//! Where a model comes from: a local folder or a Hugging Face Hub repo, turned
//! into the paths of the files a model needs ([`ModelFiles`]).
//!
//! This is the only module that imports `hf_hub`. It talks to the Hub (or any
//! server with the Hub's `/{repo}/resolve/{revision}/{file}` routes, set by
//! `HF_ENDPOINT`) through hf-hub's blocking client, and shares the on-disk cache
//! with Python's `huggingface_hub` (`models--org--name/{blobs,snapshots,refs}`),
//! so a model downloaded by either is found by the other. Offline mode reads
//! that cache and never opens a connection. The CLI builds a [`ModelRequest`]
//! (a source, and the GGUF file in it when the weights are GGUF) and
//! [`HubOptions`]; the loaders get [`ModelFiles`] or [`GgufFiles`] and never
//! see where the files came from.

use std::collections::BTreeSet;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

use crate::{Error, Result};

/// The Hub itself, used when `HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The branch used when no revision is given.
pub const DEFAULT_REVISION: &str = "main";

const CONFIG: &str = "config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const TOKENIZER: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// Newer repos keep the chat template in its own file; transformers prefers
/// it to tokenizer_config.json's `chat_template`.
const CHAT_TEMPLATE: &str = "chat_template.jinja";
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// What `--model` names: a folder on disk or a repo on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A folder holding `config.json` and the weights.
    Local(PathBuf),
    /// A Hub repo id (`org/name` or `name`) at a branch, tag or commit.
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// An existing folder wins over a repo id of the same spelling, so a
    /// downloaded copy in `./org/name` is used as is.
    pub fn parse(model: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(model);
        if path.is_dir() {
            if let Some(revision) = revision {
                tracing::warn!("ignoring revision '{revision}': {model} is a local folder");
            }
            return Ok(ModelSource::Local(path.to_path_buf()));
        }
        // An existing file (say `model/config.json`) or anything that is not a
        // repo id (`./model`, `/data/llama`, `a/b/c`) was meant as a path.
        if path.exists() || !is_repo_id(model) {
            return Err(Error::BadModelId(model.to_string()));
        }
        let revision = revision.unwrap_or(DEFAULT_REVISION);
        if !is_revision(revision) {
            return Err(Error::BadRevision(revision.to_string()));
        }
        Ok(ModelSource::Hub {
            repo: model.to_string(),
            revision: revision.to_string(),
        })
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Local(dir) => write!(f, "{}", dir.display()),
            ModelSource::Hub { repo, revision } if revision == DEFAULT_REVISION => {
                write!(f, "{repo}")
            }
            ModelSource::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

/// What `--model` and `--gguf-file` ask for together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRequest {
    pub source: ModelSource,
    /// The GGUF file inside `source` to load the model from; `None` for
    /// `config.json` and safetensors.
    pub gguf_file: Option<String>,
}

impl ModelRequest {
    /// `model` is a folder, a Hub repo id or a `.gguf` file; `gguf_file`
    /// names a GGUF file inside a folder or repo. A `.gguf` file stands for
    /// its folder with `gguf_file` set to its name, so its companions
    /// (tokenizer.json, ...) are looked for next to it.
    pub fn parse(model: &str, revision: Option<&str>, gguf_file: Option<&str>) -> Result<Self> {
        if is_gguf_name(model) {
            let path = Path::new(model);
            if !path.is_file() {
                return Err(match not_a_file(path) {
                    Some(kind) => Error::NotAFile {
                        path: path.to_path_buf(),
                        kind,
                    },
                    None => Error::NoSuchGguf(path.to_path_buf()),
                });
            }
            if let Some(name) = gguf_file {
                return Err(Error::BadGgufFile {
                    name: name.to_string(),
                    message: format!(
                        "--model already names the file {model}; give --model its folder instead"
                    ),
                });
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| Error::NoSuchGguf(path.to_path_buf()))?;
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if revision.is_some() {
                tracing::warn!("ignoring --revision: {model} is a local file");
            }
            return Ok(ModelRequest {
                source: ModelSource::Local(dir),
                gguf_file: Some(name),
            });
        }
        let source = ModelSource::parse(model, revision)?;
        if let Some(name) = gguf_file {
            check_gguf_name(name)?;
        }
        Ok(ModelRequest {
            source,
            gguf_file: gguf_file.map(str::to_string),
        })
    }
}

/// What a path that is not a regular file is instead, `None` when nothing
/// is there at all. A symlink is followed, and named with its target.
fn not_a_file(path: &Path) -> Option<String> {
    let link = std::fs::symlink_metadata(path).ok()?;
    let target = link
        .file_type()
        .is_symlink()
        .then(|| std::fs::read_link(path).ok())
        .flatten();
    let kind = match std::fs::metadata(path) {
        Err(_) => "a symlink whose target does not exist".to_owned(),
        Ok(meta) => file_kind(&meta.file_type()).to_owned(),
    };
    Some(match target {
        Some(target) => format!("{kind}; a symlink to {}", target.display()),
        None => kind,
    })
}

/// A file type in words.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a named pipe";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else if t.is_file() {
        "a file"
    } else {
        "not a file"
    }
}

/// The `.gguf` files directly in `dir`, sorted.
fn gguf_files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_gguf_name(n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn is_gguf_name(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".gguf")
}

/// A `--gguf-file` must be one whole `.gguf` file inside the model.
fn check_gguf_name(name: &str) -> Result<()> {
    let bad = |message: &str| {
        Err(Error::BadGgufFile {
            name: name.to_string(),
            message: message.to_string(),
        })
    };
    if !is_gguf_name(name) {
        return bad("the name must end in .gguf");
    }
    if !is_inside(name) {
        return bad("it must be a file inside the model's folder or repo");
    }
    // llama.cpp's split files (`…-00001-of-00003.gguf`) each hold part of
    // the tensors.
    let stem = &name[..name.len() - ".gguf".len()];
    let split = stem.rsplit_once("-of-").is_some_and(|(head, total)| {
        let part = head.rsplit('-').next().unwrap_or("");
        [part, total]
            .iter()
            .all(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
    });
    if split {
        return bad(
            "split GGUF files are not supported: merge the parts with              `llama-gguf-split --merge` first",
        );
    }
    Ok(())
}

/// The Hub's rule for repo ids: one or two segments of word characters, `-`
/// and `.`, each starting and ending with a word character, at most 96
/// characters, no `--` or `..` (they would collide in the cache's folder names).
fn is_repo_id(id: &str) -> bool {
    let segments: Vec<&str> = id.split('/').collect();
    if segments.len() > 2 || id.contains("--") || id.contains("..") {
        return false;
    }
    segments.iter().all(|segment| {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        segment.len() <= 96
            && segment.chars().all(|c| word(c) || c == '-' || c == '.')
            && segment.starts_with(word)
            && segment.ends_with(word)
    })
}

/// Branches, tags and commits; `/` is allowed (`refs/pr/1`), `..` is not since
/// the revision becomes a path under `refs/` in the cache.
fn is_revision(revision: &str) -> bool {
    !revision.is_empty()
        && !revision.contains("..")
        && !revision.starts_with('/')
        && !revision.ends_with('/')
        && !revision
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40
        && revision
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// How to reach the Hub and where its cache lives.
#[derive(Clone)]
pub struct HubOptions {
    /// Base URL, without a trailing `/`.
    pub endpoint: String,
    /// Sent as `Authorization: Bearer …`; gated and private repos need it.
    pub token: Option<String>,
    /// The hub cache folder (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// Use only what is cached; never connect.
    pub offline: bool,
    /// Draw hf-hub's progress bars on stderr.
    pub progress: bool,
}

// By hand so that a token never lands in a log line.
impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubOptions {
    /// Reads the variables `huggingface_hub` reads, with the same defaults:
    /// `HF_ENDPOINT`, `HF_TOKEN` (else the token file `huggingface-cli login`
    /// saved, at `HF_TOKEN_PATH` or `$HF_HOME/token`), `HF_HUB_CACHE` (else
    /// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`), `HF_HUB_OFFLINE`, and
    /// `HF_HUB_DISABLE_PROGRESS_BARS`; bars are drawn only when stderr is a
    /// terminal.
    pub fn from_env() -> Self {
        Self::from_lookup(
            |name| std::env::var(name).ok(),
            std::io::stderr().is_terminal(),
        )
    }

    /// [`from_env`](Self::from_env) over any variable lookup, so tests need not
    /// touch the process environment (shared by tests running in parallel).
    fn from_lookup(var: impl Fn(&str) -> Option<String>, stderr_is_terminal: bool) -> Self {
        // An exported but empty variable counts as unset, as in Python.
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let flag = |name: &str| {
            var(name).is_some_and(|value| {
                matches!(
                    value.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        };

        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                let home = var("HOME")
                    .or_else(|| var("USERPROFILE"))
                    .unwrap_or_default();
                Path::new(&home).join(".cache")
            });
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));

        let token_path = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            // A missing or unreadable token file means "anonymous", as in Python.
            .or_else(|| std::fs::read_to_string(&token_path).ok())
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty());

        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        HubOptions {
            // hf-hub appends `/{repo}/resolve/…`; a trailing `/` would double it.
            endpoint: endpoint.trim().trim_end_matches('/').to_string(),
            token,
            cache_dir,
            offline: flag("HF_HUB_OFFLINE"),
            progress: stderr_is_terminal && !flag("HF_HUB_DISABLE_PROGRESS_BARS"),
        }
    }
}

/// The files of one model, on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    /// `chat_template.jinja`, when the repo has one.
    pub chat_template: Option<PathBuf>,
    /// `model.safetensors`, or the shards named in
    /// `model.safetensors.index.json`, sorted, each once.
    pub weights: Vec<PathBuf>,
}

/// The files of a model whose weights (and hyper-parameters) are one GGUF
/// file. The others are optional: without `tokenizer.json` the tokenizer is
/// built from the GGUF metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufFiles {
    pub gguf: PathBuf,
    pub generation_config: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
}

/// A model's files, whichever format its weights are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedModel {
    Safetensors(ModelFiles),
    Gguf(GgufFiles),
}

/// Finds (downloading what is missing) the files a [`ModelRequest`] names.
pub fn resolve_request(request: &ModelRequest, opts: &HubOptions) -> Result<ResolvedModel> {
    let Some(name) = &request.gguf_file else {
        return resolve(&request.source, opts).map(ResolvedModel::Safetensors);
    };
    let files = match &request.source {
        ModelSource::Local(dir) => resolve_gguf_from(&mut LocalDir { dir }, name)?,
        ModelSource::Hub { repo, revision } => {
            resolve_gguf_from(&mut HubRepo::new(repo, revision, opts)?, name)?
        }
    };
    Ok(ResolvedModel::Gguf(files))
}

fn resolve_gguf_from(files: &mut dyn Files, name: &str) -> Result<GgufFiles> {
    check_gguf_name(name)?;
    // The GGUF first: a wrong repo or revision shows up on the file asked for.
    let gguf = files.required(name)?;
    Ok(GgufFiles {
        gguf,
        generation_config: files.optional(GENERATION_CONFIG)?,
        tokenizer: files.optional(TOKENIZER)?,
        tokenizer_config: files.optional(TOKENIZER_CONFIG)?,
        chat_template: files.optional(CHAT_TEMPLATE)?,
    })
}

/// Finds (and for the Hub, downloads unless cached) the files of a model.
///
/// `config.json` and the weights are required; `generation_config.json`,
/// `tokenizer.json` and `tokenizer_config.json` are `None` when the model has
/// none. A sharded checkpoint is recognised by its index file.
pub fn resolve(source: &ModelSource, opts: &HubOptions) -> Result<ModelFiles> {
    match source {
        ModelSource::Local(dir) => {
            // A folder of GGUF files without config.json was meant for
            // --gguf-file; say so rather than just "config.json is missing".
            if !dir.join(CONFIG).is_file() {
                let ggufs = gguf_files_in(dir);
                if !ggufs.is_empty() {
                    return Err(Error::GgufOnlyFolder {
                        dir: dir.to_path_buf(),
                        files: ggufs.join(", "),
                    });
                }
            }
            resolve_from(&mut LocalDir { dir })
        }
        ModelSource::Hub { repo, revision } => {
            resolve_from(&mut HubRepo::new(repo, revision, opts)?)
        }
    }
}

/// One place that knows which files a model has; local folders and Hub repos
/// differ only in how a file is found.
trait Files {
    /// The file, or an error naming it and where it was looked for.
    fn required(&mut self, file: &str) -> Result<PathBuf>;
    /// The file, or `None` when the model does not have it.
    fn optional(&mut self, file: &str) -> Result<Option<PathBuf>>;
}

fn resolve_from(files: &mut dyn Files) -> Result<ModelFiles> {
    let config = files.required(CONFIG)?;
    let generation_config = files.optional(GENERATION_CONFIG)?;
    let tokenizer = files.optional(TOKENIZER)?;
    let tokenizer_config = files.optional(TOKENIZER_CONFIG)?;
    let chat_template = files.optional(CHAT_TEMPLATE)?;
    let weights = match files.optional(WEIGHTS_INDEX)? {
        Some(index) => shard_names(&index)?
            .iter()
            .map(|shard| files.required(shard))
            .collect::<Result<Vec<_>>>()?,
        None => vec![files.required(WEIGHTS)?],
    };
    Ok(ModelFiles {
        config,
        generation_config,
        tokenizer,
        tokenizer_config,
        chat_template,
        weights,
    })
}

/// The shard file names of a `model.safetensors.index.json`, sorted and unique
/// (its `weight_map` names one shard per tensor).
fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let json_error = |message: String| Error::Json {
        path: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| json_error(e.to_string()))?;
    let shards: BTreeSet<String> = parsed.weight_map.into_values().collect();
    if shards.is_empty() {
        return Err(json_error("weight_map is empty".to_string()));
    }
    // The names become paths under the snapshot folder and parts of URLs: one
    // like `../../x` would read or write outside the model.
    if let Some(bad) = shards.iter().find(|shard| !is_inside(shard)) {
        return Err(json_error(format!(
            "weight_map names '{bad}', which is not a file inside the model"
        )));
    }
    Ok(shards.into_iter().collect())
}

fn is_inside(relative: &str) -> bool {
    !relative.is_empty()
        && Path::new(relative)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// A model folder on disk.
struct LocalDir<'a> {
    dir: &'a Path,
}

impl Files for LocalDir<'_> {
    fn required(&mut self, file: &str) -> Result<PathBuf> {
        self.optional(file)?.ok_or_else(|| Error::MissingFile {
            dir: self.dir.to_path_buf(),
            file: file.to_string(),
        })
    }

    fn optional(&mut self, file: &str) -> Result<Option<PathBuf>> {
        let path = self.dir.join(file);
        Ok(path.is_file().then_some(path))
    }
}

/// A repo at one revision: the cache first, then (unless offline) the Hub.
struct HubRepo<'a> {
    repo: &'a str,
    revision: &'a str,
    opts: &'a HubOptions,
    cache: CacheRepo,
    /// `<cache_dir>/models--org--name`.
    dir: PathBuf,
    /// `None` offline, so nothing below can open a connection.
    api: Option<ApiRepo>,
}

impl<'a> HubRepo<'a> {
    fn new(repo: &'a str, revision: &'a str, opts: &'a HubOptions) -> Result<Self> {
        let hf_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
        let cache = Cache::new(opts.cache_dir.clone());
        let dir = opts.cache_dir.join(hf_repo.folder_name());
        let api = if opts.offline {
            None
        } else {
            // `from_cache` rather than `new`: `new` panics without a home folder.
            // The token is always set from `opts`, replacing the one hf-hub
            // reads from the file beside the cache, so `HubOptions` is the one
            // place a token comes from.
            let api = ApiBuilder::from_cache(cache.clone())
                .with_endpoint(opts.endpoint.clone())
                .with_token(opts.token.clone())
                .with_progress(opts.progress)
                // hf-hub retries only the body transfer, resuming where it broke
                // off; worth it for multi-gigabyte shards.
                .with_retries(3)
                .with_user_agent("taper", env!("CARGO_PKG_VERSION"))
                .build()
                .map_err(|e| Error::Hub {
                    repo: repo.to_string(),
                    file: CONFIG.to_string(),
                    message: e.to_string(),
                })?;
            Some(api.repo(hf_repo.clone()))
        };
        Ok(HubRepo {
            repo,
            revision,
            opts,
            cache: cache.repo(hf_repo),
            dir,
            api,
        })
    }

    /// The commit this revision points to in the cache: `refs/<revision>`, or
    /// the revision itself when it is a commit hash.
    fn cached_commit(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("refs").join(self.revision))
            .ok()
            .map(|commit| commit.trim().to_string())
            .or_else(|| is_commit_hash(self.revision).then(|| self.revision.to_string()))
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        // hf-hub looks only under `refs/<revision>`; a commit hash asked for by
        // name has no ref when it was downloaded through a branch, but its
        // snapshot folder is named by it.
        self.cache.get(file).or_else(|| {
            let commit = self.revision;
            let path = self.dir.join("snapshots").join(commit).join(file);
            (is_commit_hash(commit) && path.exists()).then_some(path)
        })
    }

    /// `.no_exist/<commit>/<file>`: where `huggingface_hub` records that a file
    /// is absent at a commit, so the next run does not ask again.
    fn absent_marker(&self, commit: &str, file: &str) -> PathBuf {
        self.dir.join(".no_exist").join(commit).join(file)
    }

    fn known_absent(&self, file: &str) -> bool {
        self.cached_commit()
            .is_some_and(|commit| self.absent_marker(&commit, file).exists())
    }

    fn mark_absent(&self, commit: Option<&str>, file: &str) {
        // Only a commit hash names a folder safely; other answers are skipped.
        let Some(commit) = commit.filter(|c| is_commit_hash(c)) else {
            return;
        };
        let marker = self.absent_marker(commit, file);
        let written = marker
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::File::create(&marker).map(drop));
        // Losing the marker costs one request next time, nothing more.
        if let Err(e) = written {
            tracing::debug!("could not record {} as absent: {e}", marker.display());
        }
    }

    /// The file, `Ok(None)` when the repo does not have it, or an error.
    fn fetch(&self, file: &str, required: bool) -> Result<Option<PathBuf>> {
        if let Some(path) = self.cached(file) {
            tracing::debug!("{file} of {} found in the cache", self.repo);
            return Ok(Some(path));
        }
        if !required && self.known_absent(file) {
            return Ok(None);
        }
        let Some(api) = &self.api else {
            if required {
                return Err(Error::OfflineNotCached {
                    repo: self.repo.to_string(),
                    revision: self.revision.to_string(),
                    file: file.to_string(),
                    cache: self.opts.cache_dir.clone(),
                });
            }
            // A snapshot from `snapshot_download` has no markers for files the
            // repo lacks, so an uncached optional file is taken as absent.
            tracing::debug!(
                "offline: {file} of {} is not cached; going without",
                self.repo
            );
            return Ok(None);
        };
        // `download`, not `get`: the cache was just looked up, more widely.
        let failure = match api.download(file) {
            Ok(path) => return Ok(Some(path)),
            Err(e) => Failure::from(e),
        };
        let url = api.url(file);
        let repo = self.repo.to_string();
        match failure {
            // The Hub says which part of the URL was wrong in `X-Error-Code`.
            // It answers 401 for a missing repo when no token is sent, so as not
            // to reveal private repos: the code comes before the status.
            Failure::Http {
                code: Some(code), ..
            } if code == "RepoNotFound" => {
                let hint = if self.opts.token.is_none() {
                    " (or it is private and no HF_TOKEN is set)"
                } else {
                    ""
                };
                Err(Error::HubNotFound {
                    what: format!("repository {repo}{hint}"),
                    url,
                })
            }
            Failure::Http {
                code: Some(code), ..
            } if code == "RevisionNotFound" => Err(Error::HubNotFound {
                what: format!("revision '{}' of {repo}", self.revision),
                url,
            }),
            Failure::Http {
                status: status @ (401 | 403),
                ..
            } => Err(Error::HubUnauthorized { repo, status }),
            Failure::Http {
                status: 404,
                code,
                commit,
                ..
            } => {
                if !required {
                    self.mark_absent(commit.as_deref(), file);
                    return Ok(None);
                }
                // Without a code (a mirror), a 404 for the first file asked
                // for most likely means the repo or revision is wrong.
                let what = if file == CONFIG && code.is_none() {
                    format!("repository {repo} or its revision '{}'", self.revision)
                } else {
                    format!("{file} in {repo} at revision '{}'", self.revision)
                };
                Err(Error::HubNotFound { what, url })
            }
            Failure::Http {
                status, message, ..
            } => Err(Error::Hub {
                repo,
                file: file.to_string(),
                message: match message {
                    Some(message) => format!("HTTP {status} from {url}: {message}"),
                    None => format!("HTTP {status} from {url}"),
                },
            }),
            Failure::Other(message) => Err(Error::Hub {
                repo,
                file: file.to_string(),
                message,
            }),
        }
    }
}

impl Files for HubRepo<'_> {
    fn required(&mut self, file: &str) -> Result<PathBuf> {
        // `fetch` turns every absence of a required file into an error.
        self.fetch(file, true)?.ok_or_else(|| Error::HubNotFound {
            what: format!("{file} in {} at revision '{}'", self.repo, self.revision),
            url: self.opts.endpoint.clone(),
        })
    }

    fn optional(&mut self, file: &str) -> Result<Option<PathBuf>> {
        self.fetch(file, false)
    }
}

/// What went wrong in an hf-hub call, with the Hub's answer when there was one.
enum Failure {
    Http {
        status: u16,
        /// `X-Error-Code`: `RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`.
        code: Option<String>,
        /// `X-Error-Message`, the Hub's own words.
        message: Option<String>,
        /// `X-Repo-Commit`, sent with `EntryNotFound`.
        commit: Option<String>,
    },
    Other(String),
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        match error {
            ApiError::RequestError(error) => {
                let text = error.to_string();
                // ureq hands back the response of any status >= 400.
                match (*error).into_response() {
                    Some(response) => {
                        let header = |name: &str| response.header(name).map(str::to_string);
                        Failure::Http {
                            status: response.status(),
                            code: header("x-error-code"),
                            message: header("x-error-message"),
                            commit: header("x-repo-commit"),
                        }
                    }
                    None => Failure::Other(text),
                }
            }
            ApiError::TooManyRetries(inner) => Failure::from(*inner),
            ApiError::MissingHeader(name) => Failure::Other(format!(
                "the server's answer lacks the {name} header the Hub sends; \
                 is HF_ENDPOINT a Hugging Face Hub?"
            )),
            other => Failure::Other(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn hub(repo: &str, revision: &str) -> ModelSource {
        ModelSource::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
        }
    }

    #[test]
    fn parse_repo_ids() -> Result<()> {
        assert_eq!(
            ModelSource::parse("org/name", None)?,
            hub("org/name", "main")
        );
        assert_eq!(ModelSource::parse("gpt2", None)?, hub("gpt2", "main"));
        assert_eq!(
            ModelSource::parse("Qwen/Qwen2.5-0.5B-Instruct", Some("v1.0"))?,
            hub("Qwen/Qwen2.5-0.5B-Instruct", "v1.0")
        );
        assert_eq!(
            ModelSource::parse("org/name", Some("refs/pr/1"))?,
            hub("org/name", "refs/pr/1")
        );
        Ok(())
    }

    #[test]
    fn parse_existing_folder_is_local_even_with_a_revision() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let model = dir.path().to_string_lossy().into_owned();
        assert_eq!(
            ModelSource::parse(&model, None)?,
            ModelSource::Local(dir.path().to_path_buf())
        );
        assert_eq!(
            ModelSource::parse(&model, Some("main"))?,
            ModelSource::Local(dir.path().to_path_buf())
        );
        Ok(())
    }

    #[test]
    fn parse_rejects_paths_that_do_not_exist_and_bad_ids() {
        for model in [
            "./no-such-model",
            "/no/such/model",
            "../model",
            "org/name/extra",
            "org//name",
            "",
            "org/name-",
            "-org/name",
            "org/na--me",
            "org/na..me",
            "org/na me",
            "~/models/llama",
        ] {
            let err = ModelSource::parse(model, None).err();
            assert!(
                matches!(&err, Some(Error::BadModelId(id)) if id == model),
                "{model:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn parse_rejects_an_existing_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let file = dir.path().join("config.json");
        std::fs::write(&file, "{}").map_err(|e| Error::io(&file, e))?;
        let err = ModelSource::parse(&file.to_string_lossy(), None).err();
        assert!(matches!(err, Some(Error::BadModelId(_))), "{err:?}");
        Ok(())
    }

    #[test]
    fn parse_rejects_bad_revisions() {
        for revision in ["", "has space", "../escape", "/abs", "trailing/"] {
            let err = ModelSource::parse("org/name", Some(revision)).err();
            assert!(
                matches!(&err, Some(Error::BadRevision(r)) if r == revision),
                "{revision:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn a_gguf_file_stands_for_its_folder_and_name() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let file = dir.path().join("m-Q8_0.gguf");
        std::fs::write(&file, b"GGUF").map_err(|e| Error::io(&file, e))?;
        let request = ModelRequest::parse(&file.to_string_lossy(), None, None)?;
        assert_eq!(request.source, ModelSource::Local(dir.path().to_path_buf()));
        assert_eq!(request.gguf_file.as_deref(), Some("m-Q8_0.gguf"));

        // With --gguf-file as well, the file is named twice.
        let err = ModelRequest::parse(&file.to_string_lossy(), None, Some("x.gguf")).err();
        assert!(matches!(err, Some(Error::BadGgufFile { .. })), "{err:?}");
        // A .gguf that is not there is not taken for a repo id.
        let err = ModelRequest::parse("missing.gguf", None, None).err();
        assert!(matches!(err, Some(Error::NoSuchGguf(_))), "{err:?}");

        // Something other than a file is named as what it is (issue 12).
        #[cfg(unix)]
        {
            let link = dir.path().join("dev.gguf");
            std::os::unix::fs::symlink("/dev/null", &link).map_err(|e| Error::io(&link, e))?;
            let err = ModelRequest::parse(&link.to_string_lossy(), None, None).err();
            let text = err.as_ref().map(ToString::to_string).unwrap_or_default();
            assert!(matches!(err, Some(Error::NotAFile { .. })), "{err:?}");
            assert!(
                text.contains("a character device; a symlink to /dev/null"),
                "{text}"
            );
            let dangling = dir.path().join("dangling.gguf");
            std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling)
                .map_err(|e| Error::io(&dangling, e))?;
            let text = ModelRequest::parse(&dangling.to_string_lossy(), None, None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(text.contains("target does not exist"), "{text}");
        }
        let folder = dir.path().join("folder.gguf");
        std::fs::create_dir(&folder).map_err(|e| Error::io(&folder, e))?;
        let text = ModelRequest::parse(&folder.to_string_lossy(), None, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(text.contains("not a regular file (a folder)"), "{text}");

        // A repo with --gguf-file.
        let request = ModelRequest::parse("org/name-GGUF", Some("v1"), Some("a/b.Q4_K_M.gguf"))?;
        assert_eq!(request.source, hub("org/name-GGUF", "v1"));
        assert_eq!(request.gguf_file.as_deref(), Some("a/b.Q4_K_M.gguf"));
        // Without it, as before.
        assert_eq!(ModelRequest::parse("org/name", None, None)?.gguf_file, None);
        Ok(())
    }

    #[test]
    fn gguf_file_names_are_checked() {
        for (name, why) in [
            ("model.bin", ".gguf"),
            ("../up.gguf", "inside"),
            ("/abs.gguf", "inside"),
            ("model-00001-of-00004.gguf", "split"),
        ] {
            let err = ModelRequest::parse("org/name", None, Some(name))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(name) && err.contains(why), "{name}: {err}");
        }
        // Names that only look like split parts are fine.
        assert!(check_gguf_name("model-of-00004.gguf").is_ok());
        assert!(check_gguf_name("v1-of-2.gguf").is_ok());
    }

    #[test]
    fn display_names_the_revision_only_when_not_main() -> Result<()> {
        assert_eq!(
            ModelSource::parse("org/name", None)?.to_string(),
            "org/name"
        );
        assert_eq!(
            ModelSource::parse("org/name", Some("v2"))?.to_string(),
            "org/name@v2"
        );
        Ok(())
    }

    fn options(vars: &[(&str, &str)], terminal: bool) -> HubOptions {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubOptions::from_lookup(|name| vars.get(name).cloned(), terminal)
    }

    #[test]
    fn from_env_defaults() {
        let opts = options(&[("HOME", "/home/u")], true);
        assert_eq!(opts.endpoint, "https://huggingface.co");
        assert_eq!(
            opts.cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        assert!(!opts.offline);
        assert!(opts.progress);
        // No token file under /home/u in the test environment.
        assert_eq!(opts.token, None);
    }

    #[test]
    fn from_env_reads_every_variable() -> Result<()> {
        let home = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let hf_home = home.path().to_string_lossy().into_owned();
        let token_file = home.path().join("token");
        std::fs::write(&token_file, "hf_saved\n").map_err(|e| Error::io(&token_file, e))?;

        // HF_HOME places both the cache and the saved token.
        let opts = options(&[("HF_HOME", &hf_home), ("HF_HUB_OFFLINE", "1")], false);
        assert_eq!(opts.cache_dir, home.path().join("hub"));
        assert_eq!(opts.token.as_deref(), Some("hf_saved"));
        assert!(opts.offline);
        assert!(!opts.progress);

        // HF_TOKEN beats the file; HF_HUB_CACHE beats HF_HOME; `/` is trimmed.
        let opts = options(
            &[
                ("HF_HOME", &hf_home),
                ("HF_TOKEN", " hf_env "),
                ("HF_HUB_CACHE", "/cache"),
                ("HF_ENDPOINT", "http://mirror.local:8080/"),
                ("HF_HUB_OFFLINE", "TRUE"),
                ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
            ],
            true,
        );
        assert_eq!(opts.token.as_deref(), Some("hf_env"));
        assert_eq!(opts.cache_dir, PathBuf::from("/cache"));
        assert_eq!(opts.endpoint, "http://mirror.local:8080");
        assert!(opts.offline);
        assert!(!opts.progress);

        // HF_TOKEN_PATH moves the token file; empty values count as unset.
        let elsewhere = home.path().join("elsewhere");
        std::fs::write(&elsewhere, "hf_moved").map_err(|e| Error::io(&elsewhere, e))?;
        let opts = options(
            &[
                ("HOME", &hf_home),
                ("HF_TOKEN", ""),
                ("HF_TOKEN_PATH", &elsewhere.to_string_lossy()),
                ("HF_HUB_OFFLINE", "0"),
                ("XDG_CACHE_HOME", "/xdg"),
            ],
            true,
        );
        assert_eq!(opts.token.as_deref(), Some("hf_moved"));
        assert_eq!(opts.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
        assert!(!opts.offline);
        Ok(())
    }

    #[test]
    fn debug_hides_the_token() {
        let opts = options(&[("HF_TOKEN", "hf_secret"), ("HOME", "/h")], false);
        let shown = format!("{opts:?}");
        assert!(!shown.contains("hf_secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn shard_names_are_sorted_unique_and_stay_inside() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let index = dir.path().join(WEIGHTS_INDEX);
        let write = |text: &str| std::fs::write(&index, text).map_err(|e| Error::io(&index, e));

        write(
            r#"{"metadata": {}, "weight_map": {"b": "2.safetensors", "a": "1.safetensors", "c": "2.safetensors"}}"#,
        )?;
        assert_eq!(shard_names(&index)?, ["1.safetensors", "2.safetensors"]);

        write(r#"{"weight_map": {"a": "../../etc/passwd"}}"#)?;
        let err = shard_names(&index).err();
        assert!(
            matches!(&err, Some(Error::Json { path, .. }) if path == &index),
            "{err:?}"
        );

        write(r#"{"weight_map": {}}"#)?;
        assert!(matches!(shard_names(&index), Err(Error::Json { .. })));

        write("not json")?;
        assert!(matches!(shard_names(&index), Err(Error::Json { .. })));
        Ok(())
    }
}
