//! Load shedding: tiny limits, far more concurrent requests than they allow.
//! Every response is 200 or 503 with Retry-After, the waiting queue stays
//! within its bound, nobody waits past --max-queue-wait, and the KV cache
//! empties afterwards. Deadlines end requests with a clear error.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::api::{client, stream_behind_a_long_request};
use crate::harness::{Server, wait_idle};

#[tokio::test]
async fn overload_sheds_with_503_and_retry_after() {
    let srv = Server::start(&[
        "--max-num-seqs",
        "2",
        "--max-waiting-requests",
        "4",
        "--max-queue-wait",
        "3",
        "--no-prefix-caching",
    ]);
    let base = srv.base.clone();
    // Watch the queue while the load runs.
    let watcher = {
        let base = base.clone();
        tokio::spawn(async move {
            let mut max_waiting = 0;
            for _ in 0..200 {
                if let Ok(r) = client().get(format!("{base}/stats")).send().await
                    && let Ok(v) = r.json::<Value>().await
                {
                    max_waiting = max_waiting.max(v["num_requests_waiting"].as_u64().unwrap_or(0));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            max_waiting
        })
    };
    let started = Instant::now();
    let requests = (0..32).map(|i| {
        let url = format!("{base}/v1/completions");
        async move {
            let t0 = Instant::now();
            let body = json!({"prompt": format!("Request {i}: tell me a story"), "max_tokens": 48, "ignore_eos": true});
            let resp = client().post(url).json(&body).send().await.unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let body: Value = resp.json().await.unwrap();
            (status, retry_after, body, t0.elapsed())
        }
    });
    let results = futures_util::future::join_all(requests).await;
    let wall = started.elapsed();
    let (mut ok, mut shed, mut queue_timeouts) = (0, 0, 0);
    for (status, retry_after, body, took) in &results {
        match status {
            200 => ok += 1,
            503 => {
                shed += 1;
                assert!(retry_after.is_some_and(|s| s >= 1), "503 without Retry-After: {body}");
                assert_eq!(body["error"]["type"], "server_error");
                let code = body["error"]["code"].as_str().unwrap();
                assert!(code == "queue_full" || code == "queue_timeout", "{body}");
                if code == "queue_timeout" {
                    queue_timeouts += 1;
                    assert!(*took < Duration::from_secs(6), "waited {took:?} past the 3 s queue limit");
                }
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    let max_waiting = watcher.await.unwrap();
    eprintln!(
        "overload: 32 requests in {wall:?}: {ok} served, {shed} shed ({queue_timeouts} after queue wait); max waiting seen {max_waiting}"
    );
    assert!(ok >= 2, "some requests are served");
    assert!(shed >= 1, "the limits must shed some load");
    assert!(max_waiting <= 4, "waiting queue bound broken: {max_waiting}");
    let stats = wait_idle(&srv).await;
    assert_eq!(stats["kv_blocks_used"], 0, "{stats}");
    assert_eq!(stats["num_requests_waiting"], 0, "{stats}");
}

#[tokio::test]
async fn a_request_past_its_deadline_ends_with_a_clear_error_and_frees_its_blocks() {
    let srv = Server::start(&["--request-timeout", "30"]);
    let t0 = Instant::now();
    let resp = client()
        .post(srv.url("/v1/completions"))
        .json(
            &json!({"prompt": "Tell me everything.", "max_tokens": 1500, "ignore_eos": true, "timeout": 1.0}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("deadline of 1 s"), "{body}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Freed at the engine's next step boundary.
    let stats = wait_idle(&srv).await;
    assert_eq!(stats["kv_blocks_used"], 0, "{stats}");
    assert_eq!(stats["num_requests_running"], 0, "{stats}");
}

#[tokio::test]
async fn a_stream_that_waits_too_long_in_the_queue_gets_an_sse_error_event() {
    let srv = Server::start(&["--max-num-seqs", "1", "--max-queue-wait", "1", "--sse-keepalive", "0.3"]);
    let (resp, long) = stream_behind_a_long_request(&srv, 400).await;
    assert_eq!(resp.status(), 200, "the stream began before the wait ran out");
    let text = resp.text().await.unwrap();
    let error = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v.get("error").is_some())
        .unwrap_or_else(|| panic!("no error event in {text:?}"));
    assert_eq!(error["error"]["code"], "queue_timeout");
    long.abort();
}
