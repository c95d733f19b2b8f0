//! Every refusal the server makes, with its HTTP status and OpenAI-shaped
//! body, in one table.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
    /// A failure of ours, never caused by input (500).
    Internal(String),
}

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
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        }
    }

    /// Seconds for `Retry-After`, on refusals that are worth retrying.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::Unavailable { retry_after_secs, .. }
            | ApiError::Overloaded { retry_after_secs }
            | ApiError::QueueTimeout { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::Invalid { message, .. } => message.clone(),
            ApiError::ModelNotFound(m) => format!("The model `{m}` does not exist."),
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
        json!({ "error": { "message": self.message(), "type": kind, "param": param, "code": code } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, code) = self.parts();
        if !matches!(self, ApiError::Internal(_) | ApiError::Timeout { .. }) {
            let reason = code.unwrap_or("invalid_request");
            metrics::counter!(inferd_engine::metrics::REQUESTS_REJECTED_TOTAL, "reason" => reason)
                .increment(1);
        }
        let mut resp = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs() {
            resp.headers_mut().insert("retry-after", secs.max(1).into());
        }
        resp
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
