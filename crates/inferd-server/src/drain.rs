//! Draining for load balancers. On SIGTERM or SIGINT readiness turns 503 at
//! once; new requests are still served for the drain delay (the ALB needs a
//! few health checks to notice); then new API requests get 503 with
//! `Retry-After` and `Connection: close`; in-flight requests run to
//! completion up to the drain timeout, after which the engine shuts down and
//! open streams get a final error event. A second signal exits at once.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::{AppState, Phase, SharedState};

/// Drain timings from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    pub delay: Duration,
    pub timeout: Duration,
}

async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn open_requests(state: &AppState) -> usize {
    state.loaded().map(|s| s.open_choices.load(Ordering::Acquire)).sum()
}

impl Drain {
    /// Waits for the first signal, drains, and returns when the HTTP server
    /// should stop.
    pub async fn run(self, state: SharedState) {
        signal().await;
        state.set_phase(Phase::Draining);
        crate::notify::notify("STOPPING=1\nSTATUS=draining");
        tracing::info!(delay = ?self.delay, timeout = ?self.timeout, "draining: readiness now reports 503");
        tokio::spawn(async {
            signal().await;
            tracing::warn!("second signal: exiting at once");
            std::process::exit(130);
        });
        tokio::time::sleep(self.delay).await;
        state.refusing.store(true, Ordering::Release);
        tracing::info!(open = open_requests(&state), "drain delay over: refusing new requests");
        let deadline = Instant::now() + self.timeout;
        while open_requests(&state) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Cuts off whatever still runs with a final shutdown event.
        for serving in state.loaded() {
            serving.engine.shutdown();
        }
        // Give cut-off streams a moment to write their last event.
        let grace = Instant::now() + Duration::from_secs(2);
        while open_requests(&state) > 0 && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("drained");
    }
}

/// Refuses new API requests once the drain delay is over; probes and
/// metrics keep answering.
pub async fn gate(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let probe = matches!(path, "/health" | "/ready" | "/metrics" | "/stats" | "/stats/recent");
    if !probe && state.refusing.load(Ordering::Acquire) {
        let mut resp = ApiError::Unavailable {
            message: "The server is draining and takes no new requests; retry on another instance.".into(),
            retry_after_secs: 1,
        }
        .into_response();
        resp.headers_mut().insert("connection", axum::http::HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
}
