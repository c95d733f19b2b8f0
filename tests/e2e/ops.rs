//! What operators see: readiness, Prometheus metrics that move with the
//! traffic, and request ids.

use serde_json::{Value, json};

use crate::api::client;
use crate::harness::Server;

/// The value of one sample line of the exposition text; a missing series
/// fails the test (it is not read as 0).
pub fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name_and_labels} in:\n{text}"))
}

async fn get_text(srv: &Server, path: &str) -> (u16, String) {
    let resp = client().get(srv.url(path)).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn readiness_metrics_and_request_ids() {
    let srv = Server::start(&[]);
    let (status, body) = get_text(&srv, "/ready").await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["model"], "smollm2-135m-instruct");
    assert_eq!(ready["running"], 0);
    assert!(ready["kv_cache_usage"].is_number());

    let (_, before) = get_text(&srv, "/metrics").await;
    assert_eq!(sample(&before, "inferd_kv_cache_usage_ratio{model=\"smollm2-135m-instruct\"}"), 0.0);
    // A fresh instance already exports its latency histograms (at 0), so
    // dashboards and alerts have a series before the first request.
    for name in [
        "inferd_time_to_first_token_seconds_count{model=\"smollm2-135m-instruct\"}",
        "inferd_inter_token_latency_seconds_count{model=\"smollm2-135m-instruct\"}",
        "inferd_e2e_request_latency_seconds_count{model=\"smollm2-135m-instruct\"}",
        "inferd_request_queue_time_seconds_count{model=\"smollm2-135m-instruct\"}",
        "inferd_time_to_first_token_seconds_bucket{model=\"smollm2-135m-instruct\",le=\"+Inf\"}",
        "inferd_panics_total{where=\"handler\"}",
    ] {
        assert_eq!(sample(&before, name), 0.0, "{name}");
    }
    let mut prompt_tokens = 0.0;
    let mut completion_tokens = 0.0;
    for (i, id) in ["req-one", "req-two", "req-three"].iter().enumerate() {
        let resp = client()
            .post(srv.url("/v1/completions"))
            .header("x-request-id", *id)
            .json(&json!({"prompt": format!("Request number {i} says"), "max_tokens": 5 + i, "ignore_eos": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-request-id"], *id, "the client's id comes back");
        let body: Value = resp.json().await.unwrap();
        prompt_tokens += body["usage"]["prompt_tokens"].as_f64().unwrap();
        completion_tokens += body["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let (_, after) = get_text(&srv, "/metrics").await;
    let label = "{model=\"smollm2-135m-instruct\"}";
    let count = |text: &str, name: &str| sample(text, &format!("{name}_count{label}"));
    assert_eq!(
        count(&after, "inferd_time_to_first_token_seconds")
            - count(&before, "inferd_time_to_first_token_seconds"),
        3.0
    );
    assert_eq!(count(&after, "inferd_e2e_request_latency_seconds"), 3.0);
    assert_eq!(count(&after, "inferd_request_queue_time_seconds"), 3.0);
    assert_eq!(count(&after, "inferd_inter_token_latency_seconds"), completion_tokens - 3.0);
    assert_eq!(sample(&after, "inferd_generation_tokens_total"), completion_tokens);
    assert_eq!(sample(&after, "inferd_prompt_tokens_total"), prompt_tokens);
    assert_eq!(sample(&after, "inferd_requests_total{status=\"ok\",finish_reason=\"length\"}"), 3.0);
    assert_eq!(
        sample(&after, "inferd_kv_cache_usage_ratio{model=\"smollm2-135m-instruct\"}"),
        0.0,
        "KV usage returns to 0"
    );
    assert_eq!(sample(&after, "inferd_num_requests_running{model=\"smollm2-135m-instruct\"}"), 0.0);
    assert!(sample(&after, "inferd_kv_blocks_total{model=\"smollm2-135m-instruct\"}") > 0.0);
    assert!(sample(&after, "inferd_engine_step_seconds_count") >= completion_tokens / 3.0);
    assert!(after.contains("# HELP inferd_time_to_first_token_seconds"));

    // A refusal is counted, and still carries a (generated) request id.
    let resp = client().post(srv.url("/v1/completions")).json(&json!({"prompt": ""})).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(id.len() >= 16, "{id}");
    let (_, last) = get_text(&srv, "/metrics").await;
    assert_eq!(sample(&last, "inferd_requests_rejected_total{reason=\"invalid_request\"}"), 1.0);
    let (status, _) = get_text(&srv, "/health").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn json_logs_carry_the_request_id_and_never_the_prompt() {
    let path = std::env::temp_dir().join(format!("inferd-json-log-{}.log", std::process::id()));
    let log = std::fs::File::create(&path).unwrap();
    let srv = Server::start_logged(&["--log-format", "json"], &[("INFERD_LOG", "info")], log);
    let secret = "my secret prompt 4711";
    let resp = client()
        .post(srv.url("/v1/completions"))
        .header("x-request-id", "trace-abc-123")
        .json(&json!({"prompt": secret, "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(srv);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("every log line is JSON")).collect();
    assert!(lines.iter().any(|l| l.to_string().contains("trace-abc-123")), "{text}");
    assert!(!text.contains(secret), "the prompt leaked into the log");
    std::fs::remove_file(&path).ok();
}
