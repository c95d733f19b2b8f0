//! `X-Request-Id`: taken from the request or generated, returned on every
//! response, and carried by the request's tracing span (so by every log line
//! written while handling it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub const HEADER: &str = "x-request-id";

/// Longest client-supplied id kept; longer or non-visible-ASCII ids are replaced.
const MAX_LEN: usize = 128;

/// A new id, unique across restarts and processes of this host.
pub fn generate() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}{:08x}", nanos ^ u64::from(std::process::id()).rotate_left(32), n as u32)
}

fn accepted(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| s.to_string())
}

pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req.headers().get(HEADER).and_then(accepted).unwrap_or_else(generate);
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    req.headers_mut().insert(HEADER, value.clone());
    let span =
        tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let started = std::time::Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    // The access log line; never the body (prompts stay out of logs).
    span.in_scope(|| {
        tracing::info!(status = resp.status().as_u16(), ms = started.elapsed().as_millis() as u64, "handled");
    });
    resp.headers_mut().insert(HEADER, value);
    resp
}
