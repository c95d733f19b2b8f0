//! The Redis limits store against a real Redis (Debian's redis-server,
//! started here on loopback): several clients share one budget exactly,
//! quotas are shared and seeded, unused tokens come back, and a Redis
//! that goes away is an error, not a hang, until it returns.

use std::time::{Duration, Instant};

use inferd_gateway::limits::{LimitKind, LimitsConfig, Refusal};
use inferd_gateway::shared_limits::SharedLimits;
use inferd_gateway::testing::Redis;

async fn store(redis: &Redis) -> SharedLimits {
    SharedLimits::connect(&redis.url(), Duration::from_millis(500)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_share_one_budget_exactly() {
    let redis = Redis::start();
    // Three "instances" (connections), 40 concurrent admissions each, for
    // a tenant allowed 50 requests a minute: exactly 50 pass in sum.
    let cfg = LimitsConfig { requests_per_minute: Some(50), ..Default::default() };
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let s = store(&redis).await;
        for _ in 0..40 {
            let (s, cfg) = (s.clone(), cfg.clone());
            tasks.push(tokio::spawn(async move { s.admit("acme", &cfg, 10, (0, 0)).await.unwrap().is_ok() }));
        }
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 50, "the fleet shares one minute's budget");
    let s = store(&redis).await;
    match s.admit("acme", &cfg, 10, (0, 0)).await.unwrap() {
        Err(Refusal::Exceeded { kind: LimitKind::RequestsPerMinute, limit: 50, retry_after, .. }) => {
            assert!(
                retry_after <= Duration::from_millis(1300),
                "one request refills in 1.2 s: {retry_after:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(s.admit("other", &cfg, 10, (0, 0)).await.unwrap().is_ok(), "tenants do not share");
}

#[tokio::test]
async fn quotas_are_shared_seeded_and_refunded() {
    let redis = Redis::start();
    let (a, b) = (store(&redis).await, store(&redis).await);
    let cfg =
        LimitsConfig { tokens_per_day: Some(1000), tokens_per_minute: Some(10_000), ..Default::default() };
    // The first instance to see today's window seeds it with 300 already used.
    let r1 = a.admit("t", &cfg, 500, (300, 0)).await.unwrap().unwrap();
    match b.admit("t", &cfg, 300, (0, 0)).await.unwrap() {
        Err(Refusal::Exceeded { kind: LimitKind::DailyQuota, limit: 1000, available: 200, .. }) => {}
        other => panic!("800 of 1000 are used or reserved: {other:?}"),
    }
    // The request used 100 of its 500: 400 come back, for everyone.
    a.settle(&r1, 100, true).await.unwrap();
    let r2 = b.admit("t", &cfg, 600, (0, 0)).await.unwrap().unwrap();
    assert!(a.admit("t", &cfg, 1, (0, 0)).await.unwrap().is_err(), "400 + 600 = the whole day");
    b.settle(&r2, 600, true).await.unwrap();
    // A request that never ran gives back its request slot too.
    let rpm = LimitsConfig { requests_per_minute: Some(1), ..Default::default() };
    let r = a.admit("u", &rpm, 5, (0, 0)).await.unwrap().unwrap();
    assert!(b.admit("u", &rpm, 5, (0, 0)).await.unwrap().is_err());
    a.settle(&r, 0, false).await.unwrap();
    assert!(b.admit("u", &rpm, 5, (0, 0)).await.unwrap().is_ok());
}

#[tokio::test]
async fn an_unreachable_store_is_an_error_in_time_and_recovery_needs_no_restart() {
    let mut redis = Redis::start();
    let port = redis.port;
    let s = store(&redis).await;
    let cfg = LimitsConfig { requests_per_minute: Some(100), ..Default::default() };
    assert!(s.admit("t", &cfg, 1, (0, 0)).await.unwrap().is_ok());
    redis.stop();
    let started = Instant::now();
    assert!(s.admit("t", &cfg, 1, (0, 0)).await.is_err(), "a store that is down is an error");
    assert!(started.elapsed() < Duration::from_secs(3), "not a hang: {:?}", started.elapsed());
    let _back = Redis::start_on(port);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match s.admit("t", &cfg, 1, (0, 0)).await {
            Ok(r) => {
                assert!(r.is_ok());
                break;
            }
            Err(e) => assert!(Instant::now() < until, "never reconnected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
