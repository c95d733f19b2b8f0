//! Sends one request and times it: first token, each later token, the end.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::args::Endpoint;

/// What one request measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// The HTTP status, or `None` when the request never got one (refused
    /// connection, timeout, a stream cut short).
    pub status: Option<u16>,
    pub ok: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Time to the first content (the whole request when not streamed).
    pub ttft: Option<Duration>,
    /// Gaps between consecutive content chunks.
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    /// From the server's `usage`, else counted.
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

impl Outcome {
    /// Mean time per output token after the first.
    pub fn tpot(&self) -> Option<Duration> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| (self.e2e.saturating_sub(ttft)) / (self.output_tokens as u32 - 1))
    }
}

/// An error with its causes, outermost first.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// The text a chunk or response carries, on either route.
fn content(v: &Value, endpoint: Endpoint, streamed: bool) -> Option<&str> {
    let choice = v.get("choices")?.get(0)?;
    match (endpoint, streamed) {
        (Endpoint::Completions, _) => choice.get("text")?.as_str(),
        (Endpoint::Chat, true) => choice.get("delta")?.get("content")?.as_str(),
        (Endpoint::Chat, false) => choice.get("message")?.get("content")?.as_str(),
    }
}

fn usage(v: &Value) -> Option<(u64, u64)> {
    let u = v.get("usage").filter(|u| !u.is_null())?;
    Some((u.get("prompt_tokens")?.as_u64()?, u.get("completion_tokens")?.as_u64()?))
}

/// Sends `body` to `url` and measures it.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    api_key: Option<&str>,
    body: &Value,
    endpoint: Endpoint,
) -> Outcome {
    let streamed = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut attempt = 0;
    let (start, resp) = loop {
        let mut req = client.post(url).json(body);
        if let Some(key) = api_key {
            req = req.bearer_auth(key);
        }
        let start = Instant::now();
        match req.send().await {
            Ok(r) => break (start, Ok(r)),
            // A pooled keep-alive connection the server closed as we sent
            // (llama.cpp's server closes one after a few requests): the
            // request never reached it, so send it again on a new one.
            Err(e) if attempt < 2 && !e.is_timeout() && !e.is_connect() => attempt += 1,
            Err(e) => break (start, Err(e)),
        }
    };
    let mut out = Outcome::default();
    let fail = |mut out: Outcome, why: String| {
        out.e2e = start.elapsed();
        out.error = Some(why);
        out
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return fail(out, format!("request failed: {}", chain(&e))),
    };
    let status = resp.status();
    out.status = Some(status.as_u16());
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return fail(
            out,
            format!("HTTP {}: {}", status.as_u16(), text.chars().take(200).collect::<String>()),
        );
    }
    if !streamed {
        let v: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => return fail(out, format!("response body: {e}")),
        };
        out.e2e = start.elapsed();
        out.ttft = Some(out.e2e);
        match usage(&v) {
            Some((p, c)) => (out.prompt_tokens, out.output_tokens) = (p, c),
            None => {
                out.output_tokens = u64::from(content(&v, endpoint, false).is_some_and(|t| !t.is_empty()))
            }
        }
        out.ok = true;
        return out;
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut chunks = 0u64;
    let mut done = false;
    while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => return fail(out, format!("stream broke: {}", chain(&e))),
        };
        buf.extend_from_slice(&piece);
        // Events end with a blank line; a chunk may hold several or part of one.
        while let Some(end) = event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end.1).collect();
            let event = String::from_utf8_lossy(&event[..end.0]).into_owned();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else { continue };
                let data = data.trim();
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    return fail(out, format!("a stream event is not JSON: {data:.120}"));
                };
                if let Some(err) = v.get("error") {
                    return fail(out, format!("error event: {err}"));
                }
                if let Some((p, c)) = usage(&v) {
                    (out.prompt_tokens, out.output_tokens) = (p, c);
                }
                if content(&v, endpoint, true).is_some_and(|t| !t.is_empty()) {
                    let now = Instant::now();
                    match last {
                        None => out.ttft = Some(now - start),
                        Some(prev) => out.itl.push(now - prev),
                    }
                    last = Some(now);
                    chunks += 1;
                }
            }
        }
    }
    out.e2e = start.elapsed();
    if !done {
        return fail(out, "the stream ended without [DONE]".into());
    }
    if out.output_tokens == 0 {
        out.output_tokens = chunks;
    }
    out.ok = true;
    out
}

/// Where the first complete event in `buf` ends: (its text's end, the
/// separator's end). Separators are a blank line in LF or CRLF form.
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_blank_lines_in_either_form() {
        assert_eq!(event_end(b"data: 1\n\ndata: 2\n\n"), Some((7, 9)));
        assert_eq!(event_end(b"data: 1\r\n\r\nx"), Some((7, 11)));
        assert_eq!(event_end(b"data: 1\n"), None);
    }

    #[test]
    fn content_and_usage_are_read_from_either_route() {
        let c: Value = serde_json::json!({"choices": [{"text": "ab"}]});
        assert_eq!(content(&c, Endpoint::Completions, true), Some("ab"));
        let d: Value = serde_json::json!({"choices": [{"delta": {"content": "x"}}], "usage": null});
        assert_eq!(content(&d, Endpoint::Chat, true), Some("x"));
        assert_eq!(usage(&d), None);
        let u: Value =
            serde_json::json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}});
        assert_eq!(usage(&u), Some((3, 4)));
        let o = Outcome {
            ttft: Some(Duration::from_millis(100)),
            e2e: Duration::from_millis(400),
            output_tokens: 4,
            ..Default::default()
        };
        assert_eq!(o.tpot(), Some(Duration::from_millis(100)));
    }
}
