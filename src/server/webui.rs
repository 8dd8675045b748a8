//! The browser chat page (issue 17): `webui/` embedded in the binary and
//! served at `/` and `/webui/*`, so `taper serve` needs no files beside it
//! and the page works offline. The page is a client of the public API like
//! any other: it posts to `/v1/chat/completions` from the server's own
//! origin, so the cross-site checks of `middleware` let it through and the
//! API key applies to it as to everyone. `--no-webui` leaves these routes
//! out (then `/` is the API's 404).

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::state::AppState;

/// One embedded file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_bytes!("../../webui/index.html"),
    content_type: "text/html; charset=utf-8",
};
const APP_JS: Asset = Asset {
    body: include_bytes!("../../webui/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const MARKDOWN_JS: Asset = Asset {
    body: include_bytes!("../../webui/markdown.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE_CSS: Asset = Asset {
    body: include_bytes!("../../webui/style.css"),
    content_type: "text/css; charset=utf-8",
};
const ICON_SVG: Asset = Asset {
    body: include_bytes!("../../webui/icon.svg"),
    content_type: "image/svg+xml",
};

/// Scripts and styles from this server only, no inline script and no
/// plugins, requests to this server only, and no framing by other sites.
/// The renderer already escapes model output; this is the second wall, so
/// a bug there still cannot run a reply's `<script>` or `onerror`.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes, to merge into the app.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/webui/app.js",
            get(|h: HeaderMap| async move { serve(&APP_JS, &h) }),
        )
        .route(
            "/webui/markdown.js",
            get(|h: HeaderMap| async move { serve(&MARKDOWN_JS, &h) }),
        )
        .route(
            "/webui/style.css",
            get(|h: HeaderMap| async move { serve(&STYLE_CSS, &h) }),
        )
        .route(
            "/webui/icon.svg",
            get(|h: HeaderMap| async move { serve(&ICON_SVG, &h) }),
        )
}

/// The file with its type and an ETag, or 304 when the browser holds it.
/// `no-cache` makes the browser ask each time (a cheap 304): the files
/// change with the binary, under the same names, so a long max-age would
/// keep an old page's script next to a new server.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", fnv1a(asset.body));
    let headers = [
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    // Hex digits in quotes are always a valid header value.
    let etag = HeaderValue::from_str(&etag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    if fresh {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)], headers).into_response();
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (header::ETAG, etag),
        ],
        headers,
        asset.body,
    )
        .into_response()
}

/// FNV-1a, 64 bits: a stable fingerprint of a file for its ETag (not a
/// defence against anything; the files are ours).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_etag_is_304_and_another_is_the_file() {
        let first = serve(&APP_JS, &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(
            first.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(first.headers()[header::CACHE_CONTROL], "no-cache");
        let etag = first.headers()[header::ETAG].clone();

        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, etag.clone());
        assert_eq!(serve(&APP_JS, &again).status(), StatusCode::NOT_MODIFIED);
        // Another file's tag does not match.
        assert_eq!(serve(&STYLE_CSS, &again).status(), StatusCode::OK);
        let mut stale = HeaderMap::new();
        stale.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"0\""));
        assert_eq!(serve(&APP_JS, &stale).status(), StatusCode::OK);
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        let html = std::str::from_utf8(INDEX.body).expect("utf-8");
        for path in [
            "/webui/app.js",
            "/webui/markdown.js",
            "/webui/style.css",
            "/webui/icon.svg",
        ] {
            assert!(html.contains(path), "index.html does not load {path}");
        }
        // Nothing from elsewhere: the page must work offline.
        assert!(!html.contains("http://") && !html.contains("https://"));
        // No inline script (the CSP would block it).
        assert!(!html.contains("<script>"));
    }
}
