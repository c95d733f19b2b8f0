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
    // The stream must outlast the drain delay, and end well within the
    // drain timeout even on a loaded 2-core machine (300 tokens once took
    // over 60 s there while a dozen other servers ran).
    let mut srv = Server::start(&["--drain-delay", "1.5", "--drain-timeout", "180"]);
    let resp = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Count slowly:", "max_tokens": 200, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    let t0 = Instant::now();
    srv.signal(libc::SIGTERM);
    wait_draining(&srv).await;

    // Within the drain delay: still served.
    let (s, _) = {
        let r = client().post(srv.url("/tokenize")).json(&json!({"prompt": "hi"})).send().await.unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap())
    };
    assert_eq!(s, 200, "requests are served during the drain delay");

    // After it: refused, with Retry-After and Connection: close; never before.
    let late = loop {
        let r = client().post(srv.url("/tokenize")).json(&json!({"prompt": "hi"})).send().await.unwrap();
        if r.status() == 503 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never refused after the drain delay");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "refused within the drain delay: {:?}",
        t0.elapsed()
    );
    assert!(late.headers().contains_key("retry-after"));
    assert_eq!(late.headers()["connection"], "close");

    // The stream that was open runs to its end.
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains("data: [DONE]"), "{text}");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");

    let ledger = srv.ledger.clone();
    let status = tokio::task::spawn_blocking(move || srv.wait_exit(Duration::from_secs(30))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit status {status:?}");
    // The drained stream is metered; the refused request is not.
    assert_eq!(ledger_rows(&ledger), vec![("completed".into(), "length".into(), 200)]);
}

/// (outcome, finish_reason, completion_tokens) of every ledger row.
fn ledger_rows(path: &std::path::Path) -> Vec<(String, String, u64)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt =
        conn.prepare("SELECT outcome, finish_reason, completion_tokens FROM usage ORDER BY id").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
}

#[tokio::test]
async fn drain_timeout_cuts_open_streams_with_an_error_event_and_a_second_signal_exits_at_once() {
    let mut srv = Server::start(&["--drain-delay", "0.2", "--drain-timeout", "1"]);
    let resp = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Never stop:", "max_tokens": 1500, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    srv.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let mut text = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "drain timeout not applied");
    let last_data = text.lines().filter_map(|l| l.strip_prefix("data: ")).rfind(|d| *d != "[DONE]").unwrap();
    let event: Value = serde_json::from_str(last_data).unwrap();
    assert!(event["error"]["message"].as_str().unwrap().contains("shutting down"), "{last_data}");
    let ledger = srv.ledger.clone();
    let status = tokio::task::spawn_blocking(move || srv.wait_exit(Duration::from_secs(30))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    // The cut-off stream is metered, as cut off by the shutdown.
    let rows = ledger_rows(&ledger);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1.as_str()), ("shutdown", "abort"));
    assert!(rows[0].2 > 0);

    // A second signal does not wait for the drain.
    let mut srv = Server::start(&["--drain-delay", "60"]);
    srv.signal(libc::SIGTERM);
    wait_draining(&srv).await;
    srv.signal(libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || srv.wait_exit(Duration::from_secs(5))).await.unwrap();
    assert!(status.is_some(), "a second signal must exit at once");
}

/// Polls /ready until it reports draining (the signal was handled).
async fn wait_draining(srv: &Server) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client().get(srv.url("/ready")).send().await.unwrap();
        if ready.status() == 503 && ready.json::<Value>().await.unwrap()["status"] == "draining" {
            return;
        }
        assert!(Instant::now() < until, "never draining after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
