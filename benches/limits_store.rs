//! What the fleet-wide limits store adds to a request: one admit (the
//! Redis script over a loopback connection) and one settle, against
//! Debian's redis-server started here, next to the in-process limiter.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use inferd_gateway::limits::{Limiter, LimitsConfig};
use inferd_gateway::shared_limits::SharedLimits;
use inferd_gateway::testing::Redis;

fn config() -> LimitsConfig {
    LimitsConfig {
        requests_per_minute: Some(u32::MAX),
        tokens_per_minute: Some(u64::MAX / 4),
        tokens_per_day: Some(u64::MAX / 4),
        tokens_per_month: Some(u64::MAX / 4),
        max_concurrent_requests: None,
    }
}

fn limits_store(c: &mut Criterion) {
    let redis = Redis::start();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let store = rt.block_on(SharedLimits::connect(&redis.url(), Duration::from_secs(1))).unwrap();
    let cfg = config();
    let mut group = c.benchmark_group("limits_store");
    group.bench_function("redis_admit_and_settle", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = store.admit("bench", &cfg, 300, (0, 0)).await.unwrap().unwrap();
                store.settle(&r, 120, true).await.unwrap();
            })
        })
    });
    // Criterion reports means; a limit check's tail matters too: time
    // 10,000 admits one by one and print their p50 and p99.
    let mut each: Vec<Duration> = (0..10_000)
        .map(|_| {
            let started = std::time::Instant::now();
            let r = rt.block_on(store.admit("tail", &cfg, 300, (0, 0))).unwrap().unwrap();
            let took = started.elapsed();
            rt.block_on(store.settle(&r, 120, true)).unwrap();
            took
        })
        .collect();
    each.sort();
    eprintln!(
        "redis admit, 10000 calls: p50 {:?}, p99 {:?}, max {:?}",
        each[5_000], each[9_900], each[9_999]
    );
    let local = Limiter::new(cfg.clone(), 0, 0, 0);
    group.bench_function("in_process_admit_and_settle", |b| b.iter(|| local.admit(300).unwrap().settle(120)));
    group.finish();
}

criterion_group!(benches, limits_store);
criterion_main!(benches);
