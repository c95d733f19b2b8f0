//! The console at `/`: a page for operators and developers, with live
//! status, a chat playground and the usage table. Its files are compiled
//! into the binary, and the page talks to nothing but this server: its
//! Content-Security-Policy allows no other origin. `--no-console` leaves
//! these routes out (then `/` is a 404 like any unknown path).

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One file of the page: its path, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: [Asset; 4] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../console/index.html"),
    },
    Asset {
        path: "/console/console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../console/console.js"),
    },
    Asset {
        path: "/console/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../console/console.css"),
    },
    Asset {
        path: "/console/icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../console/icon.svg"),
    },
];

/// Only this origin, for everything: no CDN, no inline script, no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn serve(asset: &'static Asset) -> Response {
    (
        [
            (header::CONTENT_TYPE, asset.content_type),
            // Assets change with the binary: always revalidate.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        asset.body,
    )
        .into_response()
}

/// The console's routes, to merge into the server's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS
        .iter()
        .fold(Router::new(), |r, asset| r.route(asset.path, get(move || async move { serve(asset) })))
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    async fn fetch(path: &str) -> (axum::http::StatusCode, axum::http::HeaderMap, String) {
        let req = axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
        let resp = router::<()>().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn every_file_the_page_names_is_served_from_this_origin() {
        let (status, headers, html) = fetch("/").await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap().starts_with("default-src 'self'"));
        // Every src= and href= of the page is a path on this server, and served.
        let mut refs = 0;
        for attr in ["src=\"", "href=\""] {
            for piece in html.split(attr).skip(1) {
                let target = piece.split('"').next().unwrap();
                assert!(target.starts_with('/'), "{target} is not on this origin");
                if target.starts_with("/console/") {
                    let (status, headers, _) = fetch(target).await;
                    assert_eq!(status, 200, "{target}");
                    assert_ne!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8", "{target}");
                    refs += 1;
                }
            }
        }
        assert_eq!(refs, 3, "the script, the style sheet and the icon");
        // The script names no other origin (the one URL is SVG's namespace).
        let (_, _, js) = fetch("/console/console.js").await;
        assert_eq!(js.matches("http").count(), js.matches("http://www.w3.org/2000/svg").count());
    }
}
