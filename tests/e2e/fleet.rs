//! Limits that hold across a fleet: two inferd processes sharing one Redis
//! (Debian's redis-server on loopback) count one tenant's requests
//! together, and each applies its policy when Redis goes away.

use std::time::{Duration, Instant};

use inferd_gateway::testing::Redis;
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
