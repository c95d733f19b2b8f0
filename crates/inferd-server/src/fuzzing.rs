//! Entry points for the fuzz targets (fuzz/): the paths that turn a
//! client's bytes into typed values, callable without a server.

use std::time::Duration;

use crate::openai::{ChatRequest, CompletionRequest};

/// A request body through everything that parses and validates it before
/// tokenization: JSON into either route's request, then the sampling
/// parameters, deadline and admission bounds. Returns whether either route
/// accepted it; it must never panic.
pub fn check_request_body(data: &[u8]) -> bool {
    let max_model_len = 2048;
    let server_timeout = Duration::from_secs(600);
    let admission = crate::admission::Admission::new(256, 1_000_000);
    let mut accepted = false;
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        let prompt_len = req.prompt_len_hint();
        accepted |= req.params(prompt_len, max_model_len).is_ok()
            && crate::validate::request_timeout(req.sampling.timeout, server_timeout).is_ok()
            && admission.check_fits(req.sequences(), prompt_len).is_ok();
    }
    if let Ok(req) = serde_json::from_slice::<ChatRequest>(data) {
        accepted |= req.params(req.messages.len(), max_model_len).is_ok()
            && crate::validate::request_timeout(req.sampling.timeout, server_timeout).is_ok();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::clock::parse_time(text);
        let _ = crate::args::parse_bytes(text);
        let _ = crate::args::parse_seconds(text);
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_bodies_pass_and_hostile_ones_are_refused_without_panicking() {
        assert!(check_request_body(br#"{"prompt": "Hi", "max_tokens": 4}"#));
        assert!(check_request_body(
            br#"{"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2, "logprobs": true}"#
        ));
        for hostile in [
            &br#"{"prompt": "Hi", "timeout": 1e300, "max_tokens": 4294967295}"#[..],
            br#"{"prompt": [[1, 2], [3]], "n": 4294967295}"#,
            br#"{"prompt": "Hi", "logprobs": 4294967295, "top_k": -9223372036854775808}"#,
            br#"{"messages": [], "max_completion_tokens": 0}"#,
            b"9300000000000000",
            b"1e300GiB",
        ] {
            assert!(!check_request_body(hostile), "{}", String::from_utf8_lossy(hostile));
        }
    }
}
