//! Every refusal the server makes, with its HTTP status and OpenAI-shaped
//! body, in one table.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::limits::{LimitKind, Refusal};

/// An error the API returns to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// Malformed or out-of-range input (400).
    Invalid { message: String, param: Option<String> },
    /// Unknown model (404).
    ModelNotFound(String),
    /// Unknown route (404).
    NotFound,
    /// Request body over the limit (413).
    TooLarge(String),
    /// Not JSON (415).
    UnsupportedMediaType(String),
    /// The server cannot take it now: loading, engine stopped, draining (503).
    Unavailable { message: String, retry_after_secs: u64 },
    /// The waiting queue is full (503).
    Overloaded { retry_after_secs: u64 },
    /// Not scheduled within --max-queue-wait (503).
    QueueTimeout { waited_secs: f64, retry_after_secs: u64 },
    /// Past its total deadline (504).
    Timeout { limit_secs: f64 },
    /// The client did not send its body within the server's limit (408).
    BodyTimeout { limit_secs: f64 },
    /// A failure of ours, never caused by input (500).
    Internal(String),
    /// Missing or unknown API key (401). Never carries the key.
    Unauthorized { message: &'static str, code: &'static str },
    /// Not allowed for this tenant (403).
    Forbidden(String),
    /// No request with this id was made by this tenant (404).
    UnknownRequest(String),
    /// Over one of the tenant's limits (429).
    RateLimited { limit: LimitKind, message: String, retry_after_secs: u64 },
}

/// Set on every refusal's response: why, for per-tenant metrics.
#[derive(Debug, Clone, Copy)]
pub struct Rejected(pub &'static str);

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<&'static str>>) -> Self {
        ApiError::Invalid { message: message.into(), param: param.into().map(String::from) }
    }

    /// Status, OpenAI error `type` and `code` for each variant.
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            ApiError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            ApiError::ModelNotFound(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"))
            }
            ApiError::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found")),
            ApiError::TooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("payload_too_large"))
            }
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", Some("unsupported_media_type"))
            }
            ApiError::Unavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("unavailable"))
            }
            ApiError::Overloaded { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("queue_full"))
            }
            ApiError::QueueTimeout { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("queue_timeout"))
            }
            ApiError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", Some("timeout")),
            ApiError::BodyTimeout { .. } => {
                (StatusCode::REQUEST_TIMEOUT, "invalid_request_error", Some("request_timeout"))
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            ApiError::Unauthorized { code, .. } => {
                (StatusCode::UNAUTHORIZED, "invalid_request_error", Some(*code))
            }
            ApiError::Forbidden(_) => {
                (StatusCode::FORBIDDEN, "invalid_request_error", Some("permission_denied"))
            }
            ApiError::UnknownRequest(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error", Some("request_not_found"))
            }
            ApiError::RateLimited { limit, .. } if limit.is_quota() => {
                (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", Some("insufficient_quota"))
            }
            ApiError::RateLimited { limit: LimitKind::TokensPerMinute, .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "tokens", Some("rate_limit_exceeded"))
            }
            ApiError::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "requests", Some("rate_limit_exceeded"))
            }
        }
    }

    /// Seconds for `Retry-After`, on refusals that are worth retrying.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::Unavailable { retry_after_secs, .. }
            | ApiError::Overloaded { retry_after_secs }
            | ApiError::QueueTimeout { retry_after_secs, .. }
            | ApiError::RateLimited { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::Invalid { message, .. } => message.clone(),
            ApiError::ModelNotFound(m) => {
                format!("The model `{m}` does not exist or you do not have access to it.")
            }
            ApiError::Unauthorized { message, .. } => message.to_string(),
            ApiError::Forbidden(m) | ApiError::RateLimited { message: m, .. } => m.clone(),
            ApiError::UnknownRequest(id) => {
                format!("No request with id `{id}` was made with this tenant's keys.")
            }
            ApiError::NotFound => "Unknown route.".into(),
            ApiError::TooLarge(m) | ApiError::UnsupportedMediaType(m) | ApiError::Internal(m) => m.clone(),
            ApiError::Unavailable { message, .. } => message.clone(),
            ApiError::Overloaded { .. } => {
                "The server is at capacity: its waiting queue is full. Retry later.".into()
            }
            ApiError::QueueTimeout { waited_secs, .. } => {
                format!(
                    "The request waited {waited_secs:.1} s without being scheduled (the server's limit). Retry later."
                )
            }
            ApiError::Timeout { limit_secs } => {
                format!("The request exceeded its deadline of {limit_secs} s.")
            }
            ApiError::BodyTimeout { limit_secs } => {
                format!(
                    "The request body did not arrive within {limit_secs} s (the server's --body-read-timeout)."
                )
            }
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, code) = self.parts();
        let param = match self {
            ApiError::Invalid { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        };
        let mut body =
            json!({ "error": { "message": self.message(), "type": kind, "param": param, "code": code } });
        if let ApiError::RateLimited { limit, .. } = self {
            body["error"]["limit"] = json!(limit.as_str());
        }
        body
    }

    /// The `reason` label of a refusal in the rejection metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::RateLimited { limit, .. } => limit.as_str(),
            other => other.parts().2.unwrap_or("invalid_request"),
        }
    }

    /// A tenant's refusal, worded for the client.
    pub fn from_refusal(tenant: &str, r: Refusal) -> Self {
        match r {
            Refusal::TooLarge { kind, limit, requested } => ApiError::invalid(
                format!(
                    "This request may use up to {requested} tokens (prompt + max_tokens for every choice), more than tenant `{tenant}`'s {} of {limit}. Lower max_tokens or n.",
                    kind.as_str()
                ),
                "max_tokens",
            ),
            Refusal::StoreUnavailable { retry_after } => ApiError::Unavailable {
                message: "The shared limits store cannot be reached and this server refuses requests it cannot count; retry shortly.".into(),
                retry_after_secs: retry_after.as_secs().max(1),
            },
            Refusal::SwitchedOff { kind } => ApiError::Forbidden(format!(
                "Tenant `{tenant}` is switched off: its {} is 0. Ask the operator to raise it.",
                kind.as_str()
            )),
            Refusal::Exceeded { kind, limit, requested, available, retry_after } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let message = if kind.is_quota() {
                    let resets = crate::clock::now_unix() + secs as i64;
                    format!(
                        "Token quota exhausted for tenant `{tenant}`: {} is {limit}, this request may use {requested} and {available} are left. The quota resets at {}T00:00:00Z, in {secs} s.",
                        kind.as_str(),
                        crate::clock::date_string(resets)
                    )
                } else if kind == LimitKind::Concurrency {
                    format!(
                        "Too many concurrent requests for tenant `{tenant}`: {} is {limit}. Retry when one ends.",
                        kind.as_str()
                    )
                } else {
                    format!(
                        "Rate limit reached for tenant `{tenant}` on {}: limit {limit}, requested {requested}, available {available}. Retry in {secs} s.",
                        kind.as_str()
                    )
                };
                ApiError::RateLimited { limit: kind, message, retry_after_secs: secs }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        let rejected = !matches!(self, ApiError::Internal(_) | ApiError::Timeout { .. });
        if rejected {
            metrics::counter!(inferd_engine::metrics::REQUESTS_REJECTED_TOTAL, "reason" => self.reason())
                .increment(1);
            crate::recent::recent().rejected(self.reason());
        }
        let mut resp = (status, Json(self.body())).into_response();
        if rejected {
            resp.extensions_mut().insert(Rejected(self.reason()));
        }
        if let Some(secs) = self.retry_after_secs() {
            resp.headers_mut().insert("retry-after", secs.max(1).into());
        }
        resp
    }
}

impl From<inferd_gateway::tenants::AuthError> for ApiError {
    fn from(e: inferd_gateway::tenants::AuthError) -> Self {
        ApiError::Unauthorized { message: e.message, code: e.code }
    }
}

impl From<inferd_gateway::usage_query::QueryError> for ApiError {
    fn from(e: inferd_gateway::usage_query::QueryError) -> Self {
        use inferd_gateway::usage_query::QueryError as Q;
        match e {
            Q::Invalid { message, param } => ApiError::invalid(message, param),
            Q::Forbidden(m) => ApiError::Forbidden(m),
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as J;
        match &r {
            J::MissingJsonContentType(_) => ApiError::UnsupportedMediaType(
                "Expected a request with `Content-Type: application/json`.".into(),
            ),
            J::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::TooLarge("The request body is larger than the server accepts.".into())
            }
            _ => ApiError::invalid(format!("Invalid JSON body: {}", r.body_text()), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_openai_shape() {
        let e = ApiError::invalid("top_p must be in (0, 1], got 0", "top_p");
        let b = e.body();
        assert_eq!(b["error"]["message"], "top_p must be in (0, 1], got 0");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "top_p");
        assert!(b["error"]["code"].is_null());
        assert_eq!(ApiError::ModelNotFound("x".into()).parts().0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn unavailable_sets_retry_after() {
        let resp = ApiError::Unavailable { message: "loading".into(), retry_after_secs: 0 }.into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["retry-after"], "1");
    }
}
