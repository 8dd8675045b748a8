//! A stand-in for the Hugging Face Hub on a loopback port, for tests that must
//! not reach the internet.
//!
//! It serves repos from folders on the routes hf-hub calls,
//! `/{repo}/resolve/{revision}/{file}`, answering the way the Hub does: the
//! `X-Repo-Commit`, `ETag` and `Content-Range` headers hf-hub reads, `Range`
//! requests, a redirect to a "CDN" route for `.safetensors` files (as the Hub
//! does for LFS files, with `X-Linked-Etag`), and errors carrying the Hub's
//! `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
//! `GatedRepo`). Every request is recorded so tests can count them and read
//! their headers. One thread per connection, `Connection: close` on every
//! answer, so there is no keep-alive state to get wrong.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// A header's value, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone)]
struct Revision {
    name: String,
    commit: String,
    dir: PathBuf,
}

#[derive(Debug, Clone, Default)]
struct FakeRepo {
    revisions: Vec<Revision>,
    /// Gated: only `Authorization: Bearer <token>` gets in.
    token: Option<String>,
}

/// How to build a [`HubServer`].
#[derive(Debug, Clone, Default)]
pub struct HubServerBuilder {
    repos: HashMap<String, FakeRepo>,
    plain_errors: bool,
    forced: HashMap<String, u16>,
}

impl HubServerBuilder {
    /// Serves `dir` as `repo` at the branch or tag `revision`, whose commit is
    /// `commit` (40 hex digits); the commit hash works as a revision too.
    pub fn repo(mut self, repo: &str, revision: &str, commit: &str, dir: &Path) -> Self {
        self.repos
            .entry(repo.to_string())
            .or_default()
            .revisions
            .push(Revision {
                name: revision.to_string(),
                commit: commit.to_string(),
                dir: dir.to_path_buf(),
            });
        self
    }

    /// Makes `repo` gated: 401 without a token, 403 with another one.
    pub fn gated(mut self, repo: &str, token: &str) -> Self {
        self.repos.entry(repo.to_string()).or_default().token = Some(token.to_string());
        self
    }

    /// Answers errors with bare statuses, no `X-Error-Code` or `X-Repo-Commit`,
    /// like a plain file mirror; missing repos are a plain 404.
    pub fn plain_errors(mut self) -> Self {
        self.plain_errors = true;
        self
    }

    /// Answers every request for `file` (in any repo) with `status`.
    pub fn fail(mut self, file: &str, status: u16) -> Self {
        self.forced.insert(file.to_string(), status);
        self
    }

    pub fn start(self) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let state = Arc::new(State {
            addr,
            config: self,
            seen: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = Arc::clone(&state);
                    std::thread::spawn(move || {
                        // A client that hangs up mid-answer is its own business.
                        let _ = serve(&state, stream);
                    });
                }
            })
        };
        HubServer {
            state,
            stop,
            thread: Some(thread),
        }
    }
}

struct State {
    addr: SocketAddr,
    config: HubServerBuilder,
    seen: Mutex<Vec<SeenRequest>>,
}

/// A running fake Hub; stops when dropped.
pub struct HubServer {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    pub fn builder() -> HubServerBuilder {
        HubServerBuilder::default()
    }

    /// What to put in `HubOptions::endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state
            .seen
            .lock()
            .expect("no test thread panics holding it")
            .clone()
    }

    /// Forgets the requests so far.
    pub fn clear_requests(&self) {
        self.state
            .seen
            .lock()
            .expect("no test thread panics holding it")
            .clear();
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.state.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn empty(status: u16) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// An error the way the Hub sends it, unless the server plays a plain mirror.
    fn hub_error(state: &State, status: u16, code: &str, commit: Option<&str>) -> Self {
        let answer = Answer::empty(status);
        if state.config.plain_errors {
            return answer;
        }
        let answer = answer
            .header("X-Error-Code", code)
            .header("X-Error-Message", format!("{code} (fake hub)"));
        match commit {
            Some(commit) => answer.header("X-Repo-Commit", commit),
            None => answer,
        }
    }
}

fn serve(state: &State, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = match (parts.next(), parts.next()) {
        (Some(method), Some(target)) => (method.to_string(), target.to_string()),
        // The wake-up connection from `Drop`, or garbage.
        _ => return Ok(()),
    };
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    let request = SeenRequest {
        method,
        path: target,
        headers,
    };
    state
        .seen
        .lock()
        .expect("no test thread panics holding it")
        .push(request.clone());

    let answer = route(state, &request);
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        answer.status,
        reason(answer.status)
    )?;
    for (name, value) in &answer.headers {
        write!(out, "{name}: {value}\r\n")?;
    }
    write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        answer.body.len()
    )?;
    out.write_all(&answer.body)?;
    out.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        _ => "Whatever",
    }
}

fn route(state: &State, request: &SeenRequest) -> Answer {
    if request.method != "GET" {
        return Answer::empty(405);
    }
    if let Some(rest) = request.path.strip_prefix("/__cdn/") {
        return cdn(state, request, rest);
    }
    let Some((repo_id, rest)) = request.path.trim_start_matches('/').split_once("/resolve/") else {
        return Answer::empty(404);
    };
    // The revision is one segment; hf-hub escapes its `/` as `%2F`.
    let Some((revision, file)) = rest.split_once('/') else {
        return Answer::empty(404);
    };
    let (revision, file) = (percent_decode(revision), percent_decode(file));
    if let Some(&status) = state.config.forced.get(&file) {
        return Answer::empty(status);
    }

    let auth = request.header("Authorization");
    let Some(repo) = state.config.repos.get(repo_id) else {
        // The Hub will not say whether a repo it hides from you exists.
        let status = if auth.is_none() && !state.config.plain_errors {
            401
        } else {
            404
        };
        return Answer::hub_error(state, status, "RepoNotFound", None);
    };
    if let Some(token) = &repo.token {
        match auth {
            None => return Answer::hub_error(state, 401, "GatedRepo", None),
            Some(auth) if auth != format!("Bearer {token}") => {
                return Answer::hub_error(state, 403, "GatedRepo", None)
            }
            Some(_) => {}
        }
    }
    let Some(rev) = repo
        .revisions
        .iter()
        .find(|r| r.name == revision || r.commit == revision)
    else {
        return Answer::hub_error(state, 404, "RevisionNotFound", None);
    };
    let Some(body) = read_inside(&rev.dir, &file) else {
        return Answer::hub_error(state, 404, "EntryNotFound", Some(&rev.commit));
    };
    let etag = etag(&body);
    if file.ends_with(".safetensors") {
        // Large files live on a CDN: the Hub answers with a redirect carrying
        // the commit and the file's hash, and the CDN serves the bytes.
        return Answer::empty(302)
            .header(
                "Location",
                format!("http://{}/__cdn/{}/{file}", state.addr, rev.commit),
            )
            .header("X-Repo-Commit", rev.commit.clone())
            .header("X-Linked-Etag", format!("\"{etag}\""))
            .header("X-Linked-Size", body.len().to_string());
    }
    ranged(request, body)
        .header("ETag", format!("\"{etag}\""))
        .header("X-Repo-Commit", rev.commit.clone())
}

/// `/__cdn/{commit}/{file}`: the redirect target for `.safetensors` files.
fn cdn(state: &State, request: &SeenRequest, rest: &str) -> Answer {
    let Some((commit, file)) = rest.split_once('/') else {
        return Answer::empty(404);
    };
    let file = percent_decode(file);
    let body = state
        .config
        .repos
        .values()
        .flat_map(|repo| &repo.revisions)
        .find(|rev| rev.commit == commit)
        .and_then(|rev| read_inside(&rev.dir, &file));
    match body {
        Some(body) => ranged(request, body),
        None => Answer::empty(404),
    }
}

/// 206 with `Content-Range` for `Range: bytes=a-b` or `bytes=a-`, else 200.
fn ranged(request: &SeenRequest, body: Vec<u8>) -> Answer {
    let total = body.len();
    let Some(range) = request
        .header("Range")
        .and_then(|r| r.strip_prefix("bytes="))
    else {
        return Answer {
            status: 200,
            headers: vec![("Accept-Ranges", "bytes".to_string())],
            body,
        };
    };
    let (start, end) = range.split_once('-').unwrap_or((range, ""));
    let start: usize = start.parse().unwrap_or(0);
    let end: usize = end.parse().map_or(total.saturating_sub(1), |end: usize| {
        end.min(total.saturating_sub(1))
    });
    if start >= total || start > end {
        return Answer::empty(416).header("Content-Range", format!("bytes */{total}"));
    }
    Answer {
        status: 206,
        headers: vec![
            ("Accept-Ranges", "bytes".to_string()),
            ("Content-Range", format!("bytes {start}-{end}/{total}")),
        ],
        body: body[start..=end].to_vec(),
    }
}

/// The file's bytes, if `file` names a file inside `dir`.
fn read_inside(dir: &Path, file: &str) -> Option<Vec<u8>> {
    let inside = Path::new(file)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !inside {
        return None;
    }
    std::fs::read(dir.join(file)).ok()
}

/// Stands in for the Hub's content hash; equal bytes give equal tags, so
/// equal files in two revisions share one blob, as on the Hub.
fn etag(body: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    format!("{:016x}{:08x}", hasher.finish(), body.len())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
