//! `--device neuron` end to end through the real server, with the stand-in
//! worker (`inferd neuron-standin`) in place of NxD Inference: compiled
//! limits refused at the edge, greedy output equal to the CPU backend's,
//! and a worker that dies or reports a hardware error seen by readiness,
//! clients and the ledger as operators need.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::harness::{Server, temp_dir};

/// A compiled-model folder for SmolLM2 as neuron/compile.py writes it for
/// the server's flags (`--dry-run`: its manifest without NxDI's artifacts).
pub fn compiled_dir() -> PathBuf {
    let dir = temp_dir("neuron-compiled");
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), json!({"vocab_size": 49152}).to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .arg(crate::harness::workspace().join("neuron/compile.py"))
        .args(["--model", hf.to_str().unwrap(), "--output", dir.to_str().unwrap(), "--dry-run"])
        .args(["--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--max-model-len", "512"])
        .args(["--block-size", "16", "--tp-degree", "1"])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
    let worker = format!("{} neuron-standin", env!("CARGO_BIN_EXE_inferd"));
    let flags = [
        "--device",
        "neuron",
        "--neuron-worker",
        &worker,
        "--neuron-model-dir",
        dir.to_str().unwrap(),
        "--max-num-batched-tokens",
        "128",
    ];
    Server::start_with_env(&flags, env)
}

async fn post(srv: &Server, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new().post(srv.url(path)).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get(srv: &Server, path: &str) -> (u16, Value) {
    let resp = reqwest::get(srv.url(path)).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn chat(srv: &Server) -> String {
    let body = json!({
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16, "temperature": 0
    });
    let (status, out) = post(srv, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{out}");
    out["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_neuron_model_serves_like_the_cpu_and_refuses_what_it_was_not_compiled_for() {
    let srv = start(&compiled_dir(), &[]);
    let (_, stats) = get(&srv, "/stats").await;
    let backend = &stats["backend"];
    assert_eq!(backend["device"], "neuron");
    assert_eq!(backend["samples_on_device"], true);
    assert_eq!(backend["device_sampling"]["max_top_k"], 256);
    assert_eq!(backend["shape_buckets"], json!({"batch_sizes": [8], "token_counts": [128]}));
    assert_eq!(backend["health"]["status"], "up");
    let through_worker = chat(&srv).await;

    let long = "word ".repeat(400);
    let (status, err) = post(&srv, "/v1/completions", json!({"prompt": long, "max_tokens": 4})).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("at most 128 tokens"), "{err}");
    for (param, value) in [("frequency_penalty", json!(0.5)), ("logprobs", json!(2)), ("top_k", json!(300))] {
        let mut body = json!({"prompt": "Hello", "max_tokens": 4});
        body[param] = value;
        let (status, err) = post(&srv, "/v1/completions", body).await;
        assert_eq!(status, 400, "{param}: {err}");
        assert_eq!(err["error"]["param"], param, "{err}");
    }
    drop(srv);

    // The same greedy answer from the CPU backend on the same weights, with
    // the stand-in's f32 cache (the CPU backend's own default is f16).
    let cpu = Server::start(&["--cpu-weights", "native", "--kv-cache-dtype", "f32"]);
    assert_eq!(through_worker, chat(&cpu).await);
}

/// Child processes of `pid` (the server's step worker).
fn children(pid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    pids
}

/// Starts a long stream and returns it once its first token arrived.
async fn long_stream(srv: &Server) -> reqwest::Response {
    let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": true});
    let mut resp = reqwest::Client::new().post(srv.url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().expect("a first event");
    assert!(String::from_utf8_lossy(&first).contains("\"text\""));
    resp
}

async fn rest_of(resp: reqwest::Response) -> String {
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(60), stream.next()).await.expect("the stream ends")
    {
        body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    body
}

/// Polls /ready every few milliseconds until it is 200 again; every
/// not-ready body seen on the way.
async fn ready_again(srv: &Server) -> Vec<Value> {
    let until = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let (status, body) = get(srv, "/ready").await;
        if status == 200 {
            return seen;
        }
        seen.push(body);
        assert!(Instant::now() < until, "never ready again: {seen:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_dead_worker_is_replaced_and_a_hardware_error_takes_the_instance_out() {
    let dir = compiled_dir();
    let faults = dir.join("fault");
    let srv = start(&dir, &[("INFERD_STANDIN_FAULTS", faults.to_str().unwrap())]);
    let pid = srv.pid();
    let worker = children(pid);
    assert_eq!(worker.len(), 1, "one worker: {worker:?}");

    // Killed mid-stream: the stream ends with an error event, readiness
    // says why until a new worker serves, and the record is kept.
    let stream = long_stream(&srv).await;
    assert!(
        std::process::Command::new("kill").args(["-9", &worker[0].to_string()]).status().unwrap().success()
    );
    let body = rest_of(stream).await;
    assert!(
        body.contains("the Neuron worker") && body.contains("SIGKILL") && body.contains("server_error"),
        "{body}"
    );
    let seen = ready_again(&srv).await;
    assert!(
        seen.iter().any(|b| b["status"] == "backend_restarting"
            && b["backend"]["reason"].as_str().unwrap_or("").contains("SIGKILL")),
        "readiness reported the restart: {seen:?}"
    );
    let (_, health) = get(&srv, "/health").await;
    assert_eq!(health["status"], "ok", "a restarting worker is not a dead process");
    assert!(!children(pid).contains(&worker[0]));
    let answer = chat(&srv).await;
    assert!(!answer.is_empty());
    let metrics = reqwest::get(srv.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("inferd_backend_restarts_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(metrics.lines().any(|l| l.starts_with("inferd_backend_up{") && l.ends_with(" 1")), "{metrics}");
    let ledger = rusqlite::Connection::open(&srv.ledger).unwrap();
    let cut_off = |ledger: &rusqlite::Connection| -> i64 {
        ledger
            .query_row(
                "SELECT COUNT(*) FROM usage WHERE finish_reason = 'error' AND completion_tokens > 0",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    let until = Instant::now() + Duration::from_secs(10);
    while cut_off(&ledger) < 1 {
        assert!(Instant::now() < until, "the cut-off request's usage was never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A hardware error: not ready for good, new work refused with 503.
    let stream = long_stream(&srv).await;
    std::fs::write(&faults, "hardware").unwrap();
    let body = rest_of(stream).await;
    assert!(body.contains("1202"), "{body}");
    let (status, ready) = get(&srv, "/ready").await;
    assert_eq!((status, ready["status"].as_str()), (503, Some("backend_failed")), "{ready}");
    let (status, health) = get(&srv, "/health").await;
    assert_eq!((status, health["status"].as_str()), (503, Some("backend_failed")));
    let resp = reqwest::Client::new()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Hello", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let metrics = reqwest::get(srv.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("inferd_backend_up{") && l.ends_with(" 0")), "{metrics}");
}
