//! Tenants, API keys, rate limits, quotas, the usage ledger and feedback,
//! through the real binary. One shared server holds a tenant per test, so
//! tests running side by side never share a limit.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::api::client;
use crate::harness::{Server, temp_dir};

/// `inferd keys hash KEY`, as an operator would run it.
pub fn hash(key: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_inferd")).args(["keys", "hash", key]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A `[[tenants]]` entry with one key, `key-<id>`, and extra TOML lines.
pub fn tenant(id: &str, extra: &str) -> String {
    format!(
        "[[tenants]]\nid = \"{id}\"\nkeys = [{{ id = \"{id}-key\", sha256 = \"{}\" }}]\n{extra}\n",
        hash(&format!("key-{id}"))
    )
}

pub fn write_config(dir: &Path, tenants: &[String]) -> String {
    let path = dir.join("inferd.toml");
    std::fs::write(&path, tenants.concat()).unwrap();
    path.to_str().unwrap().to_string()
}

fn shared() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = temp_dir("tenants");
        let config = write_config(
            &dir,
            &[
                tenant("acme", ""),
                tenant("globex", ""),
                tenant("ops", "admin = true"),
                tenant("rpm", "[tenants.limits]\nrequests_per_minute = 2"),
                tenant("tpm", "[tenants.limits]\ntokens_per_minute = 1000"),
                tenant("conc", "[tenants.limits]\nmax_concurrent_requests = 1"),
                tenant("fb1", ""),
                tenant("fb2", ""),
                tenant("restricted", "models = [\"some-other-model\"]"),
                tenant("sdk", "[tenants.limits]\nrequests_per_minute = 3"),
                tenant("off-rpm", "[tenants.limits]\nrequests_per_minute = 0"),
                tenant("off-tpm", "[tenants.limits]\ntokens_per_minute = 0"),
                tenant("bystander", ""),
            ],
        );
        Server::start(&["--config", &config, "--instance-hourly-cost", "1.5"])
    })
}

/// Sends a request as `tenant` (`None`: no key).
pub async fn call(
    srv: &Server,
    tenant: Option<&str>,
    path: &str,
    body: Option<Value>,
) -> (u16, HashMap<String, String>, Value) {
    let mut req = match &body {
        Some(b) => client().post(srv.url(path)).json(b),
        None => client().get(srv.url(path)),
    };
    if let Some(t) = tenant {
        req = req.bearer_auth(format!("key-{t}"));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    let text = resp.text().await.unwrap();
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn short(prompt: &str, max_tokens: u32) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test]
async fn missing_or_wrong_keys_get_401_and_keys_pick_the_tenant() {
    let srv = shared();
    let (status, _, body) = call(srv, None, "/v1/completions", Some(short("Hi", 2))).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "missing_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let resp = client()
        .post(srv.url("/v1/chat/completions"))
        .bearer_auth("key-nobody")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(!body.to_string().contains("key-nobody"), "the key is never echoed");
    for path in ["/v1/models", "/v1/usage"] {
        assert_eq!(call(srv, None, path, None).await.0, 401, "{path}");
    }
    // Operators' routes stay open.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(client().get(srv.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let (status, _, body) = call(srv, Some("globex"), "/v1/completions", Some(short("Hi", 2))).await;
    assert_eq!(status, 200, "{body}");
    // A tenant limited to other models sees none and may use none.
    let (status, _, body) = call(srv, Some("restricted"), "/v1/models", None).await;
    assert_eq!((status, body["data"].as_array().unwrap().len()), (200, 0));
    let (status, _, body) = call(srv, Some("restricted"), "/v1/completions", Some(short("Hi", 2))).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn a_limit_of_zero_switches_a_tenant_off_with_a_403() {
    let srv = shared();
    for t in ["off-rpm", "off-tpm"] {
        for _ in 0..2 {
            let (status, headers, body) = call(srv, Some(t), "/v1/completions", Some(short("Hi", 2))).await;
            assert_eq!(status, 403, "{t}: {body}");
            assert_eq!(body["error"]["code"], "permission_denied", "{t}");
            assert!(body["error"]["message"].as_str().unwrap().contains("switched off"), "{body}");
            assert!(!headers.contains_key("retry-after"), "retrying cannot help");
        }
    }
    // The server is unharmed.
    let (status, _, body) = call(srv, Some("bystander"), "/v1/completions", Some(short("Hi", 2))).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn requests_per_minute_gives_429_with_retry_after_and_headers() {
    let srv = shared();
    let started = std::time::Instant::now();
    let mut remaining = Vec::new();
    for _ in 0..2 {
        let (status, h, body) = call(srv, Some("rpm"), "/v1/completions", Some(short("Hi", 2))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        remaining.push(h["x-ratelimit-remaining-requests"].clone());
        assert!(h.contains_key("x-ratelimit-reset-requests"));
        assert!(!h.contains_key("x-ratelimit-limit-tokens"), "no token limit configured");
    }
    assert_eq!(remaining, ["1", "0"]);
    let (status, h, body) = call(srv, Some("rpm"), "/v1/completions", Some(short("Hi", 2))).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["limit"], "requests_per_minute");
    assert!(body["error"]["message"].as_str().unwrap().contains("requests_per_minute"));
    // Two per minute: one returns every 30 s, counted from when the first
    // of the two was spent.
    let retry: f64 = h["retry-after"].parse().unwrap();
    let earliest = 30.0 - started.elapsed().as_secs_f64() - 1.0;
    assert!(retry >= earliest && retry <= 30.0, "Retry-After {retry}, expected ({earliest}, 30]");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    // Other routes of the same tenant are not held back by it.
    assert_eq!(call(srv, Some("rpm"), "/v1/models", None).await.0, 200);
}

#[tokio::test]
async fn tokens_per_minute_charges_max_tokens_and_refunds_the_unused_part() {
    let srv = shared();
    let (_, _, tok) = call(srv, Some("tpm"), "/tokenize", Some(json!({"prompt": "Once upon a time"}))).await;
    let prompt_len = tok["count"].as_u64().unwrap();
    // Stops at the first space: almost all of max_tokens comes back.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 300, "stop": [" "], "temperature": 0});
    let (status, h, resp) = call(srv, Some("tpm"), "/v1/completions", Some(body)).await;
    assert_eq!(status, 200, "{resp}");
    let used = resp["usage"]["total_tokens"].as_u64().unwrap();
    let remaining: u64 = h["x-ratelimit-remaining-tokens"].parse().unwrap();
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    assert!(used < prompt_len + 300);
    assert!(remaining + used >= 1000 - 1 && remaining <= 1000, "remaining {remaining} after using {used}");

    // A long stream holds 700 + prompt tokens while it runs.
    let long = json!({"prompt": "Once upon a time", "max_tokens": 700, "ignore_eos": true, "stream": true});
    let resp =
        client().post(srv.url("/v1/completions")).bearer_auth("key-tpm").json(&long).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let (status, h, body) =
        call(srv, Some("tpm"), "/v1/completions", Some(short("Once upon a time", 400))).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "tokens");
    assert_eq!(body["error"]["limit"], "tokens_per_minute");
    let available: f64 = h["x-ratelimit-remaining-tokens"].parse().unwrap();
    let needed = (prompt_len + 400) as f64;
    let expect = ((needed - available) / (1000.0 / 60.0)).ceil();
    let retry: f64 = h["retry-after"].parse().unwrap();
    assert!((retry - expect).abs() <= 1.0, "Retry-After {retry}, expected about {expect}");
    // The client goes away: the stream's unused tokens come back at once.
    drop(stream);
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, _, _) =
            call(srv, Some("tpm"), "/v1/completions", Some(short("Once upon a time", 400))).await;
        if status == 200 {
            ok = true;
            break;
        }
    }
    assert!(ok, "the aborted stream's tokens were refunded");
    // More than the whole per-minute budget can never pass: a 400, not a retry loop.
    let (status, _, body) = call(srv, Some("tpm"), "/v1/completions", Some(short("Hi", 1200))).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens");
}

#[tokio::test]
async fn concurrency_cap_refuses_a_second_request_until_the_first_ends() {
    let srv = shared();
    let long = json!({"prompt": "Tell me a story", "max_tokens": 64, "ignore_eos": true, "stream": true});
    let resp =
        client().post(srv.url("/v1/completions")).bearer_auth("key-conc").json(&long).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let (status, h, body) = call(srv, Some("conc"), "/v1/completions", Some(short("Hi", 2))).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["limit"], "max_concurrent_requests");
    assert!(h.contains_key("retry-after"));
    let text = resp.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    let (status, _, body) = call(srv, Some("conc"), "/v1/completions", Some(short("Hi", 2))).await;
    assert_eq!(status, 200, "{body}");
}

/// Usage objects of a streamed request with include_usage.
async fn streamed_usage(srv: &Server, tenant: &str, body: Value, feature: Option<&str>) -> Value {
    let mut req =
        client().post(srv.url("/v1/chat/completions")).bearer_auth(format!("key-{tenant}")).json(&body);
    if let Some(f) = feature {
        req = req.header("X-Inferd-Feature", f);
    }
    let text = req.send().await.unwrap().text().await.unwrap();
    let mut usage = Value::Null;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line != "[DONE]" {
            let v: Value = serde_json::from_str(line).unwrap();
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
        }
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    usage
}

#[tokio::test]
async fn usage_totals_equal_what_clients_received_per_tenant_and_feature() {
    let srv = shared();
    let mut expect: HashMap<String, (u64, u64, u64)> = HashMap::new();
    let mut add = |feature: &str, u: &Value| {
        let e = expect.entry(feature.to_string()).or_default();
        e.0 += 1;
        e.1 += u["prompt_tokens"].as_u64().unwrap();
        e.2 += u["completion_tokens"].as_u64().unwrap();
    };
    for (i, feature) in ["search", "chat", "search"].iter().enumerate() {
        let body = json!({"prompt": format!("Item {i}:"), "max_tokens": 5 + i, "temperature": 0});
        let resp = client()
            .post(srv.url("/v1/completions"))
            .bearer_auth("key-acme")
            .header("X-Inferd-Feature", *feature)
            .json(&body)
            .send()
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        add(feature, &v["usage"]);
    }
    // Feature from metadata, from user, and a stream.
    let body = json!({"prompt": "Colors:", "max_tokens": 4, "n": 2, "metadata": {"feature": "palette"}});
    let (_, _, v) = call(srv, Some("acme"), "/v1/completions", Some(body)).await;
    add("palette", &v["usage"]);
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "user": "u-42"});
    let (_, _, v) = call(srv, Some("acme"), "/v1/chat/completions", Some(body)).await;
    add("u-42", &v["usage"]);
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 7, "stream": true,
                      "stream_options": {"include_usage": true}});
    let u = streamed_usage(srv, "acme", body, Some("chat")).await;
    add("chat", &u);
    // Another tenant's traffic must not show up in acme's summary.
    call(srv, Some("globex"), "/v1/completions", Some(short("Other", 3))).await;

    let (status, _, summary) = call(srv, Some("acme"), "/v1/usage?group_by=feature", None).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["tenant"], "acme");
    let mut got = HashMap::new();
    for row in summary["data"].as_array().unwrap() {
        let key = row["feature"].as_str().unwrap().to_string();
        let vals = (
            row["requests"].as_u64().unwrap(),
            row["prompt_tokens"].as_u64().unwrap(),
            row["completion_tokens"].as_u64().unwrap(),
        );
        assert!(row["cost_usd"].as_f64().unwrap() > 0.0, "priced: {row}");
        got.insert(key, vals);
    }
    assert_eq!(got, expect);
    let total: u64 = expect.values().map(|e| e.1 + e.2).sum();
    assert_eq!(summary["totals"]["total_tokens"], total);

    // By API key: the key's id, never the key.
    let (_, _, by_key) = call(srv, Some("acme"), "/v1/usage?group_by=key", None).await;
    assert_eq!(by_key["data"].as_array().unwrap().len(), 1, "{by_key}");
    assert_eq!(by_key["data"][0]["key"], "acme-key");
    assert_eq!(by_key["data"][0]["total_tokens"], total);
    // CSV holds the same numbers.
    let resp = client()
        .get(srv.url("/v1/usage?group_by=model&format=csv"))
        .bearer_auth("key-acme")
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let csv = resp.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let row: Vec<&str> = lines[1].split(',').collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(col("total_tokens"), total.to_string());
    assert_eq!(col("model"), "smollm2-135m-instruct");

    // Scope: a tenant may not read another's; an admin reads anyone's.
    let (status, _, body) = call(srv, Some("globex"), "/v1/usage?tenant=acme", None).await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = call(srv, Some("ops"), "/v1/usage?tenant=acme", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["totals"]["total_tokens"], total);
    let (_, _, body) = call(srv, Some("ops"), "/v1/usage?group_by=tenant", None).await;
    let tenants: Vec<&str> =
        body["data"].as_array().unwrap().iter().map(|r| r["tenant"].as_str().unwrap()).collect();
    assert!(tenants.contains(&"acme") && tenants.contains(&"globex"), "{tenants:?}");
    // Bad parameters are 400s.
    for q in
        ["group_by=color", "start=yesterday", "start=2026-02-01&end=2026-01-01", "format=xml", "grup_by=day"]
    {
        let (status, _, body) = call(srv, Some("acme"), &format!("/v1/usage?{q}"), None).await;
        assert_eq!(status, 400, "{q}: {body}");
    }
}

#[tokio::test]
async fn feedback_only_from_the_requesting_tenant_and_the_last_rating_wins() {
    let srv = shared();
    let resp = client()
        .post(srv.url("/v1/completions"))
        .bearer_auth("key-fb1")
        .header("X-Request-Id", "fb1-request-1")
        .json(&short("Rate me", 3))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "fb1-request-1");
    let body: Value = resp.json().await.unwrap();
    let response_id = body["id"].as_str().unwrap().to_string();

    let rate = |t: &'static str, id: String, rating: &'static str| async move {
        call(
            shared(),
            Some(t),
            "/v1/feedback",
            Some(json!({"request_id": id, "rating": rating, "comment": "mail me at a@b.com"})),
        )
        .await
    };
    let (status, _, body) = rate("fb2", "fb1-request-1".into(), "up").await;
    assert_eq!(status, 404, "another tenant's request is refused: {body}");
    assert_eq!(body["error"]["code"], "request_not_found");
    let (status, _, body) = rate("fb1", "fb1-request-1".into(), "up").await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = rate("fb1", response_id.clone(), "down").await;
    assert_eq!(status, 200, "by response id too");
    let (status, _, body) = rate("fb1", response_id, "meh").await;
    assert_eq!(status, 400, "{body}");

    let (_, _, summary) = call(srv, Some("fb1"), "/v1/usage?group_by=model", None).await;
    let row = &summary["data"][0];
    assert_eq!((row["thumbs_up"].as_u64(), row["thumbs_down"].as_u64()), (Some(0), Some(1)), "{row}");
    assert_eq!(row["thumbs_up_share"], 0.0);
    let metrics = client().get(srv.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("inferd_feedback_total{") && l.contains("rating=\"down\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn per_tenant_metrics_use_configured_tenants_only() {
    let srv = shared();
    call(srv, Some("globex"), "/v1/completions", Some(short("Count me", 2))).await;
    call(srv, None, "/v1/completions", Some(short("Hi", 2))).await;
    let resp = client()
        .post(srv.url("/v1/completions"))
        .bearer_auth("key-mallory")
        .json(&short("Hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let metrics = client().get(srv.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let has = |prefix: &str, label: &str| metrics.lines().any(|l| l.starts_with(prefix) && l.contains(label));
    assert!(has("inferd_tenant_requests_total{", "tenant=\"globex\""), "{metrics}");
    assert!(has("inferd_tenant_prompt_tokens_total{", "tenant=\"globex\""));
    assert!(has("inferd_tenant_generation_tokens_total{", "tenant=\"globex\""));
    assert!(has("inferd_tenant_rejections_total{", "tenant=\"unauthenticated\""));
    assert!(
        has("inferd_cost_per_million_tokens_usd{", "model=\"smollm2-135m-instruct\"") || {
            // The gauge is refreshed every 2 s; give it one more round.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let m = client().get(srv.url("/metrics")).send().await.unwrap().text().await.unwrap();
            m.contains("inferd_cost_per_million_tokens_usd{")
        }
    );
    assert!(!metrics.contains("mallory"), "unknown keys never become labels");
}

fn secs_to_utc_midnight() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    86_400 - now % 86_400
}

#[tokio::test]
async fn daily_quota_is_exhausted_and_survives_a_restart() {
    let dir = temp_dir("quota");
    let config = write_config(&dir, &[tenant("q", "[tenants.limits]\ntokens_per_day = 120")]);
    let ledger = dir.join("usage.db");
    let ledger = ledger.to_str().unwrap();
    let srv = Server::start(&["--config", &config, "--ledger", ledger]);
    let mut used = 0;
    let mut refused = None;
    for _ in 0..20 {
        let (status, h, body) =
            call(&srv, Some("q"), "/v1/completions", Some(short("Count to ten:", 16))).await;
        match status {
            200 => used += body["usage"]["total_tokens"].as_u64().unwrap(),
            429 => {
                refused = Some((h, body));
                break;
            }
            other => panic!("{other}: {body}"),
        }
    }
    let (h, body) = refused.expect("the quota runs out");
    assert!(used <= 120 && used + 16 + 4 > 120 - 16, "used {used}");
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(body["error"]["limit"], "tokens_per_day");
    let retry: u64 = h["retry-after"].parse().unwrap();
    assert!(retry.abs_diff(secs_to_utc_midnight()) <= 5, "resets at UTC midnight: {retry}");
    let (_, _, usage) = call(&srv, Some("q"), "/v1/usage", None).await;
    assert_eq!(usage["quota"]["tokens_per_day"]["used"], used);
    drop(srv);

    // The ledger remembers what was spent: still exhausted after a restart.
    let srv = Server::start(&["--config", &config, "--ledger", ledger]);
    let (status, _, body) = call(&srv, Some("q"), "/v1/completions", Some(short("Count to ten:", 16))).await;
    assert_eq!(status, 429, "{body}");
    let (_, _, usage) = call(&srv, Some("q"), "/v1/usage", None).await;
    assert_eq!(usage["quota"]["tokens_per_day"]["used"], used);
    assert_eq!(usage["quota"]["tokens_per_day"]["remaining"], 120 - used);
}

/// Streams a request as `tenant` to its `[DONE]`.
async fn stream_to_end(base: String, tenant: &'static str, body: Value) {
    let resp = client()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(format!("key-{tenant}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("[DONE]"));
    assert!(!text.contains("\"error\""), "{text}");
}

/// Waits until the server reports `n` sequences waiting.
async fn wait_for_waiting(srv: &Server, n: u64) {
    let what = format!("had {n} requests waiting");
    crate::harness::wait_for_stats(srv, &what, |s| s["num_requests_waiting"].as_u64() >= Some(n)).await;
}

#[tokio::test]
async fn a_higher_priority_tenant_is_scheduled_first() {
    let dir = temp_dir("priority");
    let config = write_config(&dir, &[tenant("low", "priority = 0"), tenant("high", "priority = 10")]);
    // One sequence at a time, so the others queue behind it; a queue wait
    // long enough for a loaded 2-core machine (400 tokens once outlasted
    // the default 30 s there, and the queued requests timed out).
    let srv = Server::start(&["--config", &config, "--max-num-seqs", "1", "--max-queue-wait", "600"]);
    let long =
        json!({"prompt": "Tell me a long story", "max_tokens": 150, "ignore_eos": true, "stream": true});
    // The queued requests are long enough that one finishing after the
    // other is many engine steps apart: their records are written by
    // handler tasks that a loaded machine can delay by a step or two.
    let short = json!({"prompt": "Hi", "max_tokens": 32, "ignore_eos": true, "stream": true});
    let resp =
        client().post(srv.url("/v1/completions")).bearer_auth("key-low").json(&long).send().await.unwrap();
    let mut running = resp.bytes_stream();
    running.next().await.unwrap().unwrap();
    let low = tokio::spawn(stream_to_end(srv.base.clone(), "low", short.clone()));
    wait_for_waiting(&srv, 1).await;
    let high = tokio::spawn(stream_to_end(srv.base.clone(), "high", short));
    wait_for_waiting(&srv, 2).await;
    // Both queue behind the long request; let it finish.
    while let Some(chunk) = running.next().await {
        chunk.unwrap();
    }
    low.await.unwrap();
    high.await.unwrap();
    // The server's order, not the client's: each queued request's usage
    // record is committed when it ends, so ledger ids follow completion.
    let conn = rusqlite::Connection::open(&srv.ledger).unwrap();
    let mut stmt = conn.prepare("SELECT tenant FROM usage WHERE completion_tokens = 32 ORDER BY id").unwrap();
    let order: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    assert_eq!(order, ["high", "low"], "the high-priority request, queued later, ran before the low one");
}

#[tokio::test]
async fn an_exhausted_daily_quota_resets_at_utc_midnight() {
    let dir = temp_dir("quota-reset");
    let config = write_config(&dir, &[tenant("q", "[tenants.limits]\ntokens_per_day = 60")]);
    let srv = Server::start_with_env(&["--config", &config], &[("INFERD_FAULT_INJECTION", "1")]);
    // Once the server is up (however long that took), its clock is set to
    // 20 s before the next UTC midnight by the first request.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let clock = format!("clock={}", (now / 86_400 + 1) * 86_400 - 20);
    let mut retry = None;
    for i in 0..10 {
        let mut req = client().post(srv.url("/v1/completions")).bearer_auth("key-q");
        if i == 0 {
            req = req.header("x-inferd-fault", &clock);
        }
        let resp = req.json(&short("Count to ten:", 16)).send().await.unwrap();
        let (status, h) = (resp.status().as_u16(), resp.headers().clone());
        let body: Value = resp.json().await.unwrap();
        if status == 429 {
            assert_eq!(body["error"]["limit"], "tokens_per_day", "{body}");
            retry = Some(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap());
            break;
        }
        assert_eq!(status, 200, "{body}");
    }
    let retry = retry.expect("the quota runs out before midnight");
    assert!((1..=20).contains(&retry), "Retry-After {retry} counts down to the server's midnight");
    tokio::time::sleep(Duration::from_secs(retry + 1)).await;
    let (status, _, body) = call(&srv, Some("q"), "/v1/completions", Some(short("Count to ten:", 16))).await;
    assert_eq!(status, 200, "a new day, a new quota: {body}");
    let (_, _, usage) = call(&srv, Some("q"), "/v1/usage", None).await;
    let used = usage["quota"]["tokens_per_day"]["used"].as_u64().unwrap();
    assert!(used > 0 && used <= 60 / 2, "only today's request counts: {used}");
}

#[tokio::test]
async fn sighup_reloads_the_config_and_a_broken_one_changes_nothing() {
    let dir = temp_dir("reload");
    let config = write_config(&dir, &[tenant("r", "")]);
    let srv = Server::start(&["--config", &config]);
    assert_eq!(call(&srv, Some("r"), "/v1/models", None).await.0, 200);
    // Rotate the key: `call(.., Some("rotated"), ..)` sends `key-rotated`.
    let rotated = format!(
        "[[tenants]]\nid = \"r\"\nkeys = [{{ id = \"r-2\", sha256 = \"{}\" }}]\n",
        hash("key-rotated")
    );
    std::fs::write(&config, rotated).unwrap();
    srv.signal(libc::SIGHUP);
    let mut status = 0;
    for _ in 0..100 {
        status = call(&srv, Some("rotated"), "/v1/models", None).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "the new key works after SIGHUP");
    assert_eq!(call(&srv, Some("r"), "/v1/models", None).await.0, 401, "the old key is refused");
    // A broken config is refused and the running one stays.
    std::fs::write(&config, "[[tenants]]\nid = \"r\"\nkeys = 7\n").unwrap();
    srv.signal(libc::SIGHUP);
    let mut seen = false;
    for _ in 0..100 {
        let m = client().get(srv.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if m.lines().any(|l| l.starts_with("inferd_config_reloads_total{") && l.contains("result=\"error\""))
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the failed reload is counted");
    assert_eq!(call(&srv, Some("rotated"), "/v1/models", None).await.0, 200);
}

#[test]
fn official_python_client_authenticates_and_sees_rate_limits() {
    let base = format!("{}/v1", shared().base);
    crate::openai_sdk::run_python(
        "openai_tenants.py",
        &[&base, "key-sdk", "3"],
        "all openai tenant checks passed",
    );
}
