//! Layers around the routes: refusing other sites' pages and foreign
//! `Host` names, the API key check on `/v1/*`, counting responses by status
//! for `/metrics`, and CORS.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use super::error::AppError;
use super::state::AppState;

/// Refuses (403) a request from a browser page whose `Origin` is not
/// allowed by `--cors-allow-origin`, and, when the server listens on
/// loopback, one whose `Host` is not a loopback name or the configured
/// host. Without these any page a user visits could drive their local
/// server: browsers send "simple" cross-site requests without asking, and
/// a rebound DNS name reaches 127.0.0.1 under the page's own origin.
pub async fn refuse_foreign(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let config = state.config();
    if let Some(allowed) = &config.allowed_hosts {
        // HTTP/2 carries the name in the URI; HTTP/1.0 may send none, and
        // a browser always sends one.
        let host = req
            .headers()
            .get(header::HOST)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
        if let Some(host) = host {
            if !host_allowed(&host, allowed) {
                return AppError::forbidden(
                    "forbidden_host",
                    format!(
                        "This server answers to {} only. Given Host: {host:?}",
                        allowed.join(", ")
                    ),
                )
                .into_response();
            }
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let host = req.headers().get(header::HOST);
        if !same_origin(origin, host) && !origin_allowed(origin, &config.cors_allow_origins) {
            let origin = String::from_utf8_lossy(origin.as_bytes());
            return AppError::forbidden(
                "forbidden_origin",
                format!(
                    "Requests from the origin {origin:?} are not allowed; start the server with --cors-allow-origin {origin} to allow them."
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Whether `host` (`name`, `name:port`, `[v6]`, `[v6]:port`) names one of
/// `allowed`, case-insensitively, with any port.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Whether `origin` is the server itself as the browser reached it (its
/// scheme-less part equals `Host`): a page the server serves posting back
/// to it, which is no cross-site request. A rebound DNS name also looks
/// same-origin, which is why a loopback server checks `Host` first.
fn same_origin(origin: &HeaderValue, host: Option<&HeaderValue>) -> bool {
    let (Ok(origin), Some(Ok(host))) = (origin.to_str(), host.map(|h| h.to_str())) else {
        return false;
    };
    origin.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https") && !host.is_empty() && rest.eq_ignore_ascii_case(host)
    })
}

/// Whether an `Origin` is one `--cors-allow-origin` allows (`*`: any).
fn origin_allowed(origin: &HeaderValue, allowed: &[String]) -> bool {
    allowed
        .iter()
        .any(|a| a == "*" || a.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
}

/// The names a server listening on loopback answers to: the loopback names
/// and the `--host` it was given (IPv6 addresses in brackets, as in `Host`).
pub fn loopback_hosts(configured: &str) -> Vec<String> {
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let configured = if configured.contains(':') && !configured.starts_with('[') {
        format!("[{configured}]")
    } else {
        configured.to_owned()
    };
    if !hosts.iter().any(|h| h.eq_ignore_ascii_case(&configured)) {
        hosts.push(configured);
    }
    hosts
}

/// Requires `Authorization: Bearer <key>` when the server has a key.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.config().api_key.as_deref() else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match given {
        Some(token) if same_secret(token.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => AppError::unauthorized("Incorrect API key provided.").into_response(),
        None => {
            AppError::unauthorized("Missing API key: send it as `Authorization: Bearer <key>`.")
                .into_response()
        }
    }
}

/// Compares in time that depends only on the lengths, so response times do
/// not reveal how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by status (`taper_http_requests_total`).
pub async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    state.metrics().request_done(response.status().as_u16());
    response
}

/// CORS for the given origins (`*`: any); `None` when there are none.
/// Origins that are not valid header values are skipped; the command line
/// checks them first.
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(AllowHeaders::any()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_by_name_with_any_port() {
        let allowed = loopback_hosts("127.0.0.1");
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.2",
            "localhost.evil.example",
            "[::2]:80",
            "",
        ] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
        assert!(host_allowed("myhost:80", &loopback_hosts("myhost")));
        assert!(host_allowed("[::1]:80", &loopback_hosts("::1")));
    }

    #[test]
    fn the_servers_own_origin_is_not_cross_site() {
        let host = HeaderValue::from_static("127.0.0.1:8080");
        let own = HeaderValue::from_static("http://127.0.0.1:8080");
        assert!(same_origin(&own, Some(&host)));
        for other in [
            "http://127.0.0.1:8081",
            "http://evil.example",
            "null",
            "http://127.0.0.1:8080.evil.example",
            "file://127.0.0.1:8080",
        ] {
            let other = HeaderValue::from_str(other).expect("header");
            assert!(!same_origin(&other, Some(&host)), "{other:?}");
        }
        assert!(!same_origin(&own, None));
    }

    #[test]
    fn origins_must_be_listed() {
        let origin = HeaderValue::from_static("https://ok.example");
        assert!(!origin_allowed(&origin, &[]));
        assert!(origin_allowed(&origin, &["https://ok.example".into()]));
        assert!(origin_allowed(&origin, &["*".into()]));
        assert!(!origin_allowed(&origin, &["https://other.example".into()]));
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
