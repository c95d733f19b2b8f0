//! Health probes through a slow load and a stalled engine, and keep-alive
//! comments on a stream held in the queue. Faults come from the debug-only
//! INFERD_FAULT_* switches.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::api::{client, stream_behind_a_long_request};
use crate::harness::{Server, workspace};

async fn probe(base: &str, path: &str) -> Option<(u16, Value)> {
    let resp = client().get(format!("{base}{path}")).timeout(Duration::from_secs(2)).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.json().await.unwrap_or(Value::Null)))
}

#[tokio::test]
async fn port_listens_while_loading_and_ready_turns_200_after() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .current_dir(workspace())
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--kv-cache-memory", "64MiB"])
        .env("INFERD_FAULT_LOAD_DELAY_MS", "2500")
        .env("INFERD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut saw_loading = false;
    let mut saw_ready = false;
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until && !saw_ready {
        match probe(&base, "/ready").await {
            Some((503, body)) if body["status"] == "loading" => {
                saw_loading = true;
                let (s, _) = probe(&base, "/health").await.unwrap();
                assert_eq!(s, 200, "alive while loading");
                let r = client()
                    .post(format!("{base}/v1/completions"))
                    .json(&json!({"prompt": "x"}))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 503 {
                    assert!(r.headers().contains_key("retry-after"));
                } else {
                    // Loading finished between the probe and the request.
                    let (now, _) = probe(&base, "/ready").await.unwrap();
                    assert_eq!(now, 200, "answered {} while still loading", r.status());
                }
            }
            Some((200, body)) => {
                assert_eq!(body["status"], "ready");
                saw_ready = true;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(saw_loading, "/ready never reported loading");
    assert!(saw_ready, "/ready never turned 200");
}

#[tokio::test]
async fn a_stalled_engine_fails_health_and_readiness() {
    let srv = Server::start_with_env(&["--engine-stall-timeout", "1"], &[("INFERD_FAULT_STALL_MS", "2500")]);
    assert_eq!(probe(&srv.base, "/health").await.unwrap().0, 200, "idle is not stalled");
    let base = srv.base.clone();
    let req = tokio::spawn(async move {
        client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "hi", "max_tokens": 3}))
            .send()
            .await
    });
    let mut health = None;
    let mut ready = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let h = probe(&srv.base, "/health").await.unwrap();
        let r = probe(&srv.base, "/ready").await.unwrap();
        if h.0 == 503 && r.0 == 503 {
            health = Some(h);
            ready = Some(r);
            break;
        }
    }
    let (_, h) = health.expect("/health never reported the stall");
    let (_, r) = ready.unwrap();
    assert_eq!(h["status"], "stalled");
    assert_eq!(r["status"], "stalled");
    req.abort();
}

#[tokio::test]
async fn keep_alive_comments_arrive_while_a_stream_waits_in_the_queue() {
    let srv = Server::start(&["--max-num-seqs", "1", "--sse-keepalive", "0.2"]);
    let (resp, long) = stream_behind_a_long_request(&srv, 120).await;
    let mut body = resp.bytes_stream();
    let chunk = tokio::time::timeout(Duration::from_secs(5), body.next()).await.unwrap().unwrap().unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.starts_with(": keep-alive") || text.starts_with(":keep-alive"), "first bytes: {text:?}");
    long.abort();
}

/// Sends one HTTP/1.1 GET on an open connection and reads the status line.
fn get_on(stream: &mut std::net::TcpStream, path: &str) -> String {
    use std::io::{Read, Write};
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()
}

#[test]
fn idle_keep_alive_connections_outlive_the_alb_idle_timeout() {
    // The ALB keeps idle connections to targets for 60 s by default; the
    // server must not close them first.
    let srv = crate::api::server();
    let addr = srv.base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(get_on(&mut stream, "/health"), "HTTP/1.1 200 OK");
    std::thread::sleep(Duration::from_secs(65));
    assert_eq!(get_on(&mut stream, "/health"), "HTTP/1.1 200 OK", "the connection was closed while idle");
}
