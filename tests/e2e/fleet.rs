//! Limits and usage that hold across a fleet: inferd processes sharing one
//! Redis (Debian's redis-server on loopback) count one tenant's requests
//! together, and each applies its policy when Redis goes away; sharing one
//! PostgreSQL ledger, they report the fleet's usage, take feedback on each
//! other's requests, and lose no record to a killed instance or an outage.

use std::time::{Duration, Instant};

use inferd_gateway::testing::Redis;
use inferd_ledger::testing::Postgres;
use serde_json::json;

use crate::harness::{Server, temp_dir};
use crate::tenants::{call, tenant, write_config};

async fn complete(srv: &Server) -> (u16, std::collections::HashMap<String, String>) {
    let body = json!({"prompt": "Hi", "max_tokens": 1});
    let (status, headers, _) = call(srv, Some("acme"), "/v1/completions", Some(body)).await;
    (status, headers)
}

#[tokio::test]
async fn a_rate_limit_holds_in_sum_across_instances_and_each_applies_its_failure_policy() {
    let mut redis = Redis::start();
    let dir = temp_dir("fleet");
    let config = write_config(&dir, &[tenant("acme", "limits = { requests_per_minute = 4 }")]);
    let store = redis.url();
    let open = Server::start(&["--config", &config, "--limits-store", &store]);
    let closed =
        Server::start(&["--config", &config, "--limits-store", &store, "--limits-store-failure", "closed"]);

    // Eight requests, alternating: the tenant's 4 a minute hold in sum.
    let mut statuses = Vec::new();
    for i in 0..8 {
        statuses.push(complete(if i % 2 == 0 { &open } else { &closed }).await.0);
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 4, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 4, "{statuses:?}");

    // Redis goes away: `open` falls back to its own limits (a fresh bucket
    // of 4), `closed` refuses with 503 and Retry-After.
    let port = redis.port;
    redis.stop();
    assert_eq!(complete(&open).await.0, 200, "fail-open serves on local limits");
    let (status, headers) = complete(&closed).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    let metrics = reqwest::get(open.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("inferd_limits_store_errors_total{policy=\"open\"}"), "{metrics}");

    // Redis comes back: `closed` serves again without a restart.
    let _back = Redis::start_on(port);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = complete(&closed).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < until, "never served again after Redis returned: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A completion of prompt (under 5 tokens) + exactly 20 tokens.
async fn ask(srv: &Server) -> (u16, std::collections::HashMap<String, String>, serde_json::Value) {
    let body = json!({"prompt": "Hi", "max_tokens": 20, "ignore_eos": true});
    call(srv, Some("acme"), "/v1/completions", Some(body)).await
}

#[tokio::test]
async fn a_daily_quota_is_shared_by_the_fleet_and_outlives_an_instance_restart() {
    let redis = Redis::start();
    let dir = temp_dir("fleet-quota");
    let config = write_config(&dir, &[tenant("acme", "limits = { tokens_per_day = 50 }")]);
    let flags = ["--config", &config, "--limits-store", &redis.url()];
    let a = Server::start(&flags);
    let b = Server::start(&flags);
    // Each request takes prompt (under 5 tokens) + 20: two fit in 50, a third does not.
    let (status, _, first) = ask(&a).await;
    assert_eq!(status, 200, "{first}");
    assert!(first["usage"]["prompt_tokens"].as_u64().unwrap() < 5, "{first}");
    assert_eq!(ask(&b).await.0, 200);
    let (status, _, refused) = ask(&a).await;
    assert_eq!(status, 429, "the quota is the fleet's, not each instance's: {refused}");
    assert_eq!(refused["error"]["limit"], "tokens_per_day", "{refused}");
    // A restarted instance (its own fresh ledger) still sees the fleet's day.
    drop(a);
    let a = Server::start(&flags);
    let (status, _, refused) = ask(&a).await;
    assert_eq!(status, 429, "{refused}");
}

/// The fleet's usage in the tenant's `/v1/usage` totals, through `srv`.
async fn fleet_usage(srv: &Server) -> serde_json::Value {
    let (status, _, summary) = call(srv, Some("acme"), "/v1/usage", None).await;
    assert_eq!(status, 200, "{summary}");
    summary["totals"].clone()
}

/// A PostgreSQL, and two instances with tenant `acme` using it as ledger.
fn two_instances_on_one_postgres(name: &str) -> (Postgres, Server, Server) {
    let pg = Postgres::start();
    let config = write_config(&temp_dir(name), &[tenant("acme", "")]);
    let url = pg.url();
    let flags = ["--config", &config, "--ledger", &url];
    let (a, b) = (Server::start(&flags), Server::start(&flags));
    (pg, a, b)
}

#[tokio::test]
async fn usage_and_feedback_are_the_fleets_with_one_postgres_ledger() {
    let (_pg, a, b) = two_instances_on_one_postgres("fleet-ledger");
    let mut tokens = 0;
    let mut ids = Vec::new();
    for i in 0..4 {
        let (status, _, body) = ask(if i % 2 == 0 { &a } else { &b }).await;
        assert_eq!(status, 200, "{body}");
        tokens += body["usage"]["total_tokens"].as_u64().unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    // Each response ended after its record's commit: both instances see
    // all four at once.
    for srv in [&a, &b] {
        let totals = fleet_usage(srv).await;
        assert_eq!((totals["requests"].as_u64(), totals["total_tokens"].as_u64()), (Some(4), Some(tokens)));
    }
    // A request made through `a` is rated through `b`.
    let rate = json!({"request_id": ids[0], "rating": "up"});
    let (status, _, body) = call(&b, Some("acme"), "/v1/feedback", Some(rate)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) =
        call(&a, Some("acme"), "/v1/feedback", Some(json!({"request_id": "nope", "rating": "up"}))).await;
    assert_eq!(status, 404);
    assert_eq!(fleet_usage(&a).await["thumbs_up"], 1);
}

#[tokio::test]
async fn kill_9_of_one_instance_loses_no_completed_requests_record() {
    let (_pg, a, b) = two_instances_on_one_postgres("fleet-kill");
    // Four clients keep `a` busy; it is killed once eight have completed,
    // with more in flight.
    let completed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (endpoint, completed) = (a.url("/v1/completions"), completed.clone());
            tokio::spawn(async move {
                let body = json!({"prompt": "Hi", "max_tokens": 20, "ignore_eos": true});
                loop {
                    let sent =
                        crate::api::client().post(&endpoint).bearer_auth("key-acme").json(&body).send().await;
                    let Ok(resp) = sent else { return };
                    let Ok(v) = resp.json::<serde_json::Value>().await else { return };
                    if let Some(id) = v["id"].as_str() {
                        completed.lock().unwrap().push(id.to_string());
                    }
                }
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(120);
    while completed.lock().unwrap().len() < 8 {
        assert!(Instant::now() < until, "the load never completed eight requests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.signal(libc::SIGKILL);
    for c in clients {
        let _ = c.await;
    }
    let completed = completed.lock().unwrap().clone();
    assert!(completed.len() >= 8);
    // Every request whose response arrived has its record: `b` finds each.
    for id in &completed {
        let rate = json!({"request_id": id, "rating": "up"});
        let (status, _, body) = call(&b, Some("acme"), "/v1/feedback", Some(rate)).await;
        assert_eq!(status, 200, "{id}: {body}");
    }
    let requests = fleet_usage(&b).await["requests"].as_u64().unwrap();
    assert!(requests >= completed.len() as u64, "{requests} records for {} completed", completed.len());
}

#[tokio::test]
async fn a_postgres_outage_queues_records_refuses_past_the_backlog_and_loses_nothing() {
    let mut pg = Postgres::start();
    let dir = temp_dir("fleet-outage");
    let config = write_config(&dir, &[tenant("acme", "")]);
    let url = pg.url();
    let a = Server::start(&["--config", &config, "--ledger", &url, "--ledger-max-backlog", "3"]);
    assert_eq!(ask(&a).await.0, 200);
    assert_eq!(ask(&a).await.0, 200);

    pg.stop();
    // Requests go on; their records wait in memory, three at most.
    for _ in 0..3 {
        let (status, _, body) = ask(&a).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, headers, body) = ask(&a).await;
    assert_eq!(status, 503, "past the backlog: {body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    let ready = reqwest::get(a.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["ledger"].as_str()),
        (Some("ledger_backlog_full"), Some("failing"))
    );
    assert_eq!(ready["ledger_pending"], 3);
    let (status, headers, _) = call(&a, Some("acme"), "/v1/usage", None).await;
    assert_eq!(status, 503, "the ledger cannot be read");
    assert!(headers.contains_key("retry-after"));
    let metrics = reqwest::get(a.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "inferd_ledger_failing 1"), "{metrics}");

    // PostgreSQL returns: the queue drains, the instance is ready again,
    // and every request that ran is recorded once.
    pg.resume();
    let until = Instant::now() + Duration::from_secs(60);
    while reqwest::get(a.url("/ready")).await.unwrap().status() != 200 {
        assert!(Instant::now() < until, "never ready again after PostgreSQL returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ask(&a).await.0, 200);
    assert_eq!(fleet_usage(&a).await["requests"], 6);
}
