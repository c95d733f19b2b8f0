//! Connections and what one client may hold: the accept loop with a
//! header-read timeout and header limits (axum's `serve` sets neither), a
//! whole-body deadline so a slow client cannot keep a request open, and the
//! net that turns a panic in a handler into a 500 instead of a dropped
//! connection.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::{FutureExt, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::error::ApiError;

/// The most header fields one request may carry.
pub const MAX_HEADERS: usize = 100;

/// Limits on one connection and one request.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A client must send a whole request head within this, counted from
    /// when the server waits for it (so idle keep-alive connections close too).
    pub header_read_timeout: Duration,
    /// A client must send the whole body within this.
    pub body_read_timeout: Duration,
    /// The largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// The largest body, in bytes.
    pub max_body_bytes: usize,
}

/// Serves `app` on `listener` over HTTP/1.1 until `shutdown` completes,
/// then waits for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            app.clone().oneshot(req.map(Body::new))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_headers(MAX_HEADERS)
            .max_header_size(limits.max_header_bytes)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Middleware: reads the whole request body within the deadline and the
/// size limit before any handler runs; 408 or 413 otherwise.
pub async fn read_body(State(limits): State<ConnLimits>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = async {
        let mut data = Vec::new();
        let mut frames = body.into_data_stream();
        while let Some(chunk) = frames.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::invalid(format!("Reading the request body failed: {e}"), None))?;
            if data.len() + chunk.len() > limits.max_body_bytes {
                return Err(ApiError::TooLarge(format!(
                    "The request body is larger than the server accepts ({} bytes).",
                    limits.max_body_bytes
                )));
            }
            data.extend_from_slice(&chunk);
        }
        Ok(data)
    };
    match tokio::time::timeout(limits.body_read_timeout, read).await {
        Ok(Ok(data)) => next.run(Request::from_parts(parts, Body::from(data))).await,
        Ok(Err(e)) => e.into_response(),
        Err(_) => {
            ApiError::BodyTimeout { limit_secs: limits.body_read_timeout.as_secs_f64() }.into_response()
        }
    }
}

/// Middleware: a panic while handling a request becomes a 500 with an
/// OpenAI-shaped body and a count in `inferd_panics_total`.
pub async fn catch_panic(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(payload) => {
            panicked("handler", &path, payload.as_ref());
            internal_error()
        }
    }
}

/// Counts and logs a caught panic.
pub fn panicked(place: &'static str, path: &str, payload: &(dyn std::any::Any + Send)) {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into());
    tracing::error!(place, path, panic = %what, "caught a panic while handling a request");
    metrics::counter!(inferd_engine::metrics::PANICS_TOTAL, "where" => place).increment(1);
}

/// What a client gets when the server failed it: never the panic's text.
pub fn internal_error() -> Response {
    ApiError::Internal(
        "The server failed while handling this request; the failure is logged. Retry, and report it if it persists."
            .into(),
    )
    .into_response()
}

/// Fault injection for tests, debug builds only: with
/// `INFERD_FAULT_INJECTION=1` in the environment, a generation request's
/// `X-Inferd-Fault` header makes it fail (`panic-handler`, `panic-stream`)
/// or sets the server's wall clock (`clock=<unix seconds>`). Release builds
/// ignore both.
pub mod fault {
    use axum::http::HeaderMap;

    #[cfg(debug_assertions)]
    fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("INFERD_FAULT_INJECTION").is_ok_and(|v| v == "1"))
    }

    #[cfg(not(debug_assertions))]
    fn enabled() -> bool {
        false
    }

    /// The fault a request asks for, if injection is on.
    pub fn requested(headers: &HeaderMap) -> Option<&str> {
        if !enabled() {
            return None;
        }
        headers.get("x-inferd-fault").and_then(|v| v.to_str().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    fn limits() -> ConnLimits {
        ConnLimits {
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_millis(300),
            max_header_bytes: 16 * 1024,
            max_body_bytes: 64,
        }
    }

    async fn boom() -> &'static str {
        panic!("boom")
    }

    fn app() -> Router {
        Router::new()
            .route("/boom", get(boom))
            .route("/len", post(|body: axum::body::Bytes| async move { body.len().to_string() }))
            .layer(axum::middleware::from_fn_with_state(limits(), read_body))
            .layer(axum::middleware::from_fn(catch_panic))
    }

    async fn status_and_body(req: Request) -> (u16, serde_json::Value) {
        let resp = app().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_500_with_an_openai_body() {
        let (status, body) = status_and_body(Request::get("/boom").body(Body::empty()).unwrap()).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["type"], "server_error");
        assert!(
            !body["error"]["message"].as_str().unwrap().contains("boom"),
            "the panic text stays in the log"
        );
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413_and_within_it_pass() {
        let (status, body) =
            status_and_body(Request::post("/len").body(Body::from(vec![b'x'; 65])).unwrap()).await;
        assert_eq!(status, 413);
        assert_eq!(body["error"]["code"], "payload_too_large");
        let resp =
            app().oneshot(Request::post("/len").body(Body::from(vec![b'x'; 64])).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn a_body_that_never_ends_is_a_408() {
        // A body stream that yields one chunk, then nothing, forever.
        let chunks =
            futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{"))])
                .chain(futures_util::stream::pending());
        let (status, body) =
            status_and_body(Request::post("/len").body(Body::from_stream(chunks)).unwrap()).await;
        assert_eq!(status, 408);
        assert_eq!(body["error"]["code"], "request_timeout");
    }
}
