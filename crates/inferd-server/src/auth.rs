//! The API routes' gate: who is calling (401 otherwise), and on the way
//! out the OpenAI-style `x-ratelimit-*` headers and per-tenant rejection
//! counts.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use inferd_gateway::metrics as m;

use crate::error::Rejected;
use crate::limits::BucketView;
use crate::state::SharedState;
use crate::tenants::UNAUTHENTICATED;

/// A duration as OpenAI writes resets: `250ms`, `1.5s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{:.3}", secs);
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let whole = d.as_secs();
    if whole < 3600 {
        format!("{}m{}s", whole / 60, whole % 60)
    } else {
        format!("{}h{}m{}s", whole / 3600, whole / 60 % 60, whole % 60)
    }
}

fn set(resp: &mut Response, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

fn set_bucket(resp: &mut Response, names: [&'static str; 3], bucket: Option<BucketView>) {
    if let Some(b) = bucket {
        set(resp, names[0], b.limit.to_string());
        set(resp, names[1], b.remaining.to_string());
        set(resp, names[2], format_reset(b.reset));
    }
}

/// Authenticates the request into a [`crate::tenants::Caller`] extension.
pub async fn authenticate(State(st): State<SharedState>, mut req: Request, next: Next) -> Response {
    let authorization =
        req.headers().get(axum::http::header::AUTHORIZATION).map(|v| v.to_str().map_err(|_| ()));
    let caller = match st.tenants().authenticate(authorization).map_err(crate::error::ApiError::from) {
        Ok(c) => c,
        Err(e) => {
            metrics::counter!(m::TENANT_REJECTIONS_TOTAL, "tenant" => UNAUTHENTICATED, "reason" => e.reason())
                .increment(1);
            return e.into_response();
        }
    };
    req.extensions_mut().insert(caller.clone());
    let mut resp = next.run(req).await;
    if let Some(Rejected(reason)) = resp.extensions().get::<Rejected>().copied() {
        metrics::counter!(m::TENANT_REJECTIONS_TOTAL, "tenant" => caller.tenant.id.to_string(), "reason" => reason)
            .increment(1);
    }
    let (requests, tokens) = caller.tenant.limiter.buckets();
    set_bucket(
        &mut resp,
        ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
        requests,
    );
    set_bucket(
        &mut resp,
        ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
        tokens,
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(format_reset(Duration::from_millis(250)), "250ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(2)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3725)), "1h2m5s");
    }
}
