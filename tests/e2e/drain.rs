//! SIGTERM during a stream: readiness turns 503 at once, requests are still
//! served during the drain delay and refused (503, Retry-After, Connection:
//! close) after it, the open stream completes, and the process exits 0.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::api::client;
use crate::harness::Server;

#[tokio::test]
async fn sigterm_drains_without_dropping_the_stream() {
    let mut srv = Server::start(&["--drain-delay", "1.5", "--drain-timeout", "60"]);
    let resp = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Count slowly:", "max_tokens": 300, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    let t0 = Instant::now();
    srv.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = client().get(srv.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "draining");

    // Within the drain delay: still served.
    let (s, _) = {
        let r = client().post(srv.url("/tokenize")).json(&json!({"prompt": "hi"})).send().await.unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap())
    };
    assert_eq!(s, 200, "requests are served during the drain delay");

    // After it: refused, with Retry-After and Connection: close.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(t0.elapsed()) + Duration::from_millis(300))
        .await;
    let late = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 503);
    assert!(late.headers().contains_key("retry-after"));
    assert_eq!(late.headers()["connection"], "close");

    // The stream that was open runs to its end.
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");

    let status = tokio::task::spawn_blocking(move || srv.wait_exit(Duration::from_secs(30))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit status {status:?}");
}
