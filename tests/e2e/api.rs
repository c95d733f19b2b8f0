//! The OpenAI routes through the whole stack.

use std::sync::OnceLock;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::harness::Server;

/// One server shared by the tests of this file.
pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(&[]))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

pub async fn post(path: &str, body: Value) -> (u16, Value) {
    let resp = client().post(server().url(path)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The `data:` payloads of an SSE response, `[DONE]` included.
pub async fn sse(path: &str, body: Value) -> Vec<String> {
    let resp = client().post(server().url(path)).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
}

async fn stats_of(srv: &Server) -> Value {
    client().get(srv.url("/stats")).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn completion_returns_text_and_exact_usage() {
    let (status, body) = post(
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let choice = &body["choices"][0];
    assert!(!choice["text"].as_str().unwrap().is_empty());
    let returned = choice["logprobs"]["tokens"].as_array().unwrap().len() as u64;
    assert_eq!(body["usage"]["completion_tokens"], returned);
    assert_eq!(body["usage"]["total_tokens"], body["usage"]["prompt_tokens"].as_u64().unwrap() + returned);
    assert!(["length", "stop"].contains(&choice["finish_reason"].as_str().unwrap()));
}

#[tokio::test]
async fn chat_answers_and_streams_the_same_text() {
    let req = json!({"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 12, "temperature": 0});
    let (status, body) = post("/v1/chat/completions", req.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let full = body["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = sse("/v1/chat/completions", streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, full, "streamed and complete responses agree");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], body["usage"]["prompt_tokens"]);
    assert_eq!(usage["completion_tokens"], body["usage"]["completion_tokens"]);
    // The same prompt again: its full blocks come from the prefix cache.
    assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert!(chunks.last().unwrap()["choices"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn streamed_completion_usage_counts_streamed_tokens() {
    let events = sse(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": true, "logprobs": 0,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    let chunks: Vec<Value> =
        events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let tokens: usize =
        chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array()).map(Vec::len).sum();
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], tokens as u64);
    assert_eq!(tokens, 10);
}

#[tokio::test]
async fn concurrent_greedy_requests_equal_their_solo_outputs() {
    let prompts: Vec<String> =
        (0..16).map(|i| format!("List {} facts about the number {}:", i % 3 + 2, i * 7)).collect();
    let body = |p: &str| json!({"prompt": p, "max_tokens": 16, "temperature": 0});
    let mut solo = Vec::new();
    for p in &prompts {
        let (s, b) = post("/v1/completions", body(p)).await;
        assert_eq!(s, 200);
        solo.push(b["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let together =
        futures_util::future::join_all(prompts.iter().map(|p| post("/v1/completions", body(p)))).await;
    for (i, (s, b)) in together.iter().enumerate() {
        assert_eq!(*s, 200);
        assert_eq!(b["choices"][0]["text"].as_str().unwrap(), solo[i], "request {i} changed when batched");
    }
}

#[tokio::test]
async fn stop_strings_cut_the_text_and_end_with_stop() {
    let (_, free) =
        post("/v1/completions", json!({"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0})).await;
    let text = free["choices"][0]["text"].as_str().unwrap();
    // Stop at the second character of the free-running output.
    let stop: String = text.chars().skip(2).take(2).collect();
    assert!(!stop.trim().is_empty(), "{text:?}");
    let (s, b) = post(
        "/v1/completions",
        json!({"prompt": "1, 2, 3, 4,", "max_tokens": 12, "temperature": 0, "stop": [stop]}),
    )
    .await;
    assert_eq!(s, 200);
    let cut = b["choices"][0]["text"].as_str().unwrap();
    assert_eq!(b["choices"][0]["finish_reason"], "stop");
    assert!(!cut.contains(&stop));
    assert!(text.starts_with(cut));
    assert!(b["usage"]["completion_tokens"].as_u64().unwrap() < 12);
}

#[tokio::test]
async fn seeds_reproduce_and_n_gives_several_choices() {
    let req = json!({"prompt": "My favourite colour is", "max_tokens": 12, "temperature": 1.0, "seed": 1234, "n": 3});
    let (s1, a) = post("/v1/completions", req.clone()).await;
    let (s2, b) = post("/v1/completions", req).await;
    assert_eq!((s1, s2), (200, 200));
    let texts = |v: &Value| -> Vec<String> {
        v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(texts(&a), texts(&b), "same seed, same output");
    let idx: Vec<u64> =
        a["choices"].as_array().unwrap().iter().map(|c| c["index"].as_u64().unwrap()).collect();
    assert_eq!(idx, [0, 1, 2]);
    let distinct: std::collections::HashSet<_> = texts(&a).into_iter().collect();
    assert!(distinct.len() > 1, "choices draw differently");
}

#[tokio::test]
async fn a_client_that_disconnects_gets_its_blocks_freed() {
    // A server of its own: other tests' traffic would move its counters.
    let srv = Server::start(&[]);
    let resp = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Write a very long story about a dragon.", "max_tokens": 1500, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    // Read a few chunks, so the sequence is running and holds blocks.
    for _ in 0..3 {
        body.next().await.unwrap().unwrap();
    }
    let before = stats_of(&srv).await;
    assert!(before["kv_blocks_used"].as_u64().unwrap() > 0, "{before}");
    assert_eq!(before["num_requests_running"], 1);
    drop(body);
    let mut freed = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = stats_of(&srv).await;
        if s["num_requests_running"] == 0 && s["kv_blocks_used"] == 0 {
            freed = Some(s);
            break;
        }
    }
    let freed = freed.unwrap_or_else(|| panic!("blocks not freed after disconnect"));
    let generated = freed["generated_tokens"].as_u64().unwrap();
    assert!(generated < 1500, "the engine stopped long before max_tokens: {freed}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = stats_of(&srv).await;
    assert_eq!(later["engine_steps"], freed["engine_steps"], "engine still computing: {later}");
}

#[tokio::test]
async fn models_and_tokenize_round_trip() {
    let m: Value = client().get(server().url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(m["data"][0]["id"], "smollm2-135m-instruct");
    let (s, t) = post("/tokenize", json!({"prompt": "Hello"})).await;
    assert_eq!(s, 200);
    assert_eq!(t["tokens"], json!([19556]));
    let (s, d) = post("/detokenize", json!({"tokens": [19556]})).await;
    assert_eq!(s, 200);
    assert_eq!(d["prompt"], "Hello");
    let (_, chat) = post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(chat["count"], 37);
}

/// Occupies the only running slot of a `--max-num-seqs 1` server with a long
/// request, then starts a streamed request that has to wait in the queue;
/// returns the queued stream's response and the occupying request's task.
pub async fn stream_behind_a_long_request(
    srv: &Server,
    long_tokens: u32,
) -> (reqwest::Response, tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>) {
    let base = srv.base.clone();
    let long = tokio::spawn(async move {
        client()
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "Go on and on:", "max_tokens": long_tokens, "ignore_eos": true}))
            .send()
            .await
    });
    crate::harness::wait_for_stats(srv, "ran the long request", |s| s["num_requests_running"] == 1).await;
    let queued = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Queued:", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    (queued, long)
}
