//! Hostile and unlucky input: values that overflow arithmetic, sizes a
//! client controls, slow and silent clients, and panics, each answered
//! with a status and an OpenAI-shaped body while the server keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::api::client;
use crate::harness::Server;
use crate::ops::sample;

/// A server with short connection timeouts and fault injection on.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        Server::start_with_env(
            &["--header-read-timeout", "1", "--body-read-timeout", "1", "--max-waiting-requests", "64"],
            &[("INFERD_FAULT_INJECTION", "1")],
        )
    })
}

async fn post(path: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client().post(server().url(path)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_else(|| panic!("no OpenAI error body: {body}"))
}

#[tokio::test]
async fn numbers_that_used_to_overflow_get_answers() {
    // A huge timeout is capped by the server's, not a dropped connection.
    let (status, _, body) =
        post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2, "timeout": 1e300})).await;
    assert_eq!(status, 200, "{body}");
    for bad in [json!(0), json!(-1)] {
        let (status, _, body) =
            post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2, "timeout": bad})).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "timeout");
    }
    // A start far beyond any date is refused, not wrapped to a negative one.
    for q in ["start=9300000000000000", "end=-5", "start=99999-01-01"] {
        let resp = client().get(server().url(&format!("/v1/usage?{q}"))).send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 400, "{q}: {body}");
        assert!(message(&body).contains("between 1970 and 9999"), "{body}");
    }
}

#[tokio::test]
async fn a_request_that_can_never_be_admitted_is_a_400_not_a_503() {
    // A server of its own: the 64 sequences that fit fill its whole queue,
    // which would refuse the other tests' requests on the shared one.
    let srv = Server::start(&["--max-waiting-requests", "64"]);
    let url = srv.url("/v1/completions");
    let post = |body: Value| {
        let request = client().post(url.clone()).json(&body);
        async move {
            let resp = request.send().await.unwrap();
            let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
            (status, headers, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // 16 choices of each of 5 prompts: 80 sequences, more than the queue's 64.
    let (status, headers, body) =
        post(json!({"prompt": ["a", "b", "c", "d", "e"], "n": 16, "max_tokens": 1})).await;
    assert_eq!(status, 400, "{body}");
    assert!(headers.get("retry-after").is_none());
    assert!(message(&body).contains("--max-waiting-requests"), "{body}");
    // Four prompts of 16 fit.
    let (status, _, body) = post(json!({"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 1})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn client_controlled_sizes_are_bounded() {
    let chat = |messages: Vec<Value>| json!({"messages": messages, "max_tokens": 1});
    let cases = [
        ("/v1/completions", json!({"prompt": "Hi", "stop": ["x".repeat(513)]}), "stop"),
        ("/v1/completions", json!({"prompt": "Hi", "stop": vec!["s"; 17]}), "stop"),
        ("/v1/completions", json!({"prompt": "Hi", "stop_token_ids": vec![5; 65]}), "stop_token_ids"),
        ("/v1/chat/completions", chat(vec![json!({"role": "user", "content": "x"}); 2049]), "messages"),
    ];
    for (path, body, param) in cases {
        let (status, _, resp) = post(path, body).await;
        assert_eq!(status, 400, "{param}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{resp}");
    }
    // logit_bias: bounded, in range, in the vocabulary; and it works.
    let bias = |n: usize, v: f64| -> Value {
        (0..n).map(|i| (i.to_string(), json!(v))).collect::<serde_json::Map<_, _>>().into()
    };
    for (body, what) in [
        (json!({"prompt": "Hi", "logit_bias": bias(301, 1.0)}), "at most 300"),
        (json!({"prompt": "Hi", "logit_bias": {"5": 101}}), "[-100, 100]"),
        (json!({"prompt": "Hi", "logit_bias": {"x": 1}}), "token ids"),
        (json!({"prompt": "Hi", "logit_bias": {"999999": 1}}), "outside the vocabulary"),
    ] {
        let (status, _, resp) = post("/v1/completions", body).await;
        assert_eq!(status, 400, "{resp}");
        assert_eq!(resp["error"]["param"], "logit_bias");
        assert!(message(&resp).contains(what), "{resp}");
    }
    // Token 19556 is "Hello": a bias of 100 makes it every greedy token.
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logit_bias": {"19556": 100}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], "HelloHelloHello");
    // Right at the bounds: served.
    let (status, _, body) = post(
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 2, "stop": ["y".repeat(512)], "stop_token_ids": vec![5; 64]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Sends `bytes` on a fresh connection and reads until the server closes
/// it (or 10 s pass); the text received and how long until the close.
fn raw_exchange(bytes: &[u8]) -> (String, Duration) {
    let addr = server().base.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

#[test]
fn silent_and_slow_clients_cannot_hold_a_connection() {
    // Connects and sends nothing: closed after the 1 s header-read timeout.
    let (text, took) = raw_exchange(b"");
    assert!(took < Duration::from_secs(8), "held for {took:?}");
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    // Half a request head, then silence.
    let (_, took) = raw_exchange(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
    assert!(took < Duration::from_secs(8), "held for {took:?}");
    // A whole head, but a body that never completes: 408 with a JSON body.
    let (text, took) = raw_exchange(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"",
    );
    assert!(took < Duration::from_secs(8), "held for {took:?}");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    // Headers over the limit: refused with 431, never read into memory.
    let big = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n", "j".repeat(100 * 1024));
    let (text, _) = raw_exchange(big.as_bytes());
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (text, _) = raw_exchange(format!("GET /health HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes());
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");
}

#[tokio::test]
async fn a_panic_is_a_500_with_a_body_and_a_metric() {
    let metrics =
        || async { client().get(server().url("/metrics")).send().await.unwrap().text().await.unwrap() };
    let before = metrics().await;
    let resp = client()
        .post(server().url("/v1/completions"))
        .header("x-inferd-fault", "panic-handler")
        .json(&json!({"prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .expect("an answer, not a dropped connection");
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    assert!(!message(&body).contains("injected"), "the panic's text stays in the log: {body}");

    // In a stream: an error event for the choice, then the end of the stream.
    let resp = client()
        .post(server().url("/v1/completions"))
        .header("x-inferd-fault", "panic-stream")
        .json(&json!({"prompt": "Hi", "max_tokens": 4, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("the stream ends cleanly");
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert!(events.iter().any(|e| e.contains("\"server_error\"")), "{text}");
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");

    let after = metrics().await;
    for place in ["handler", "stream"] {
        let name = format!("inferd_panics_total{{where=\"{place}\"}}");
        assert_eq!(sample(&after, &name) - sample(&before, &name), 1.0, "{name}");
    }
    // Still serving, and nothing left running.
    let (status, _, body) = post("/v1/completions", json!({"prompt": "Hello", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{body}");
    let stats = crate::harness::wait_idle(server()).await;
    assert_eq!(stats["kv_blocks_used"], 0, "{stats}");
}
