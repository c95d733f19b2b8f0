//! The usage ledger's write path: records per second through the one
//! batching writer, with many requests ending at once and each waiting for
//! its commit (as completing requests do), and fire-and-forget (as cut-off
//! requests do). A real file in WAL mode, in the system's temp folder; and
//! a real PostgreSQL (Debian's, on loopback, its default durability:
//! fsync and synchronous_commit on) for the fleet's ledger.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inferd_ledger::{Durability, Ledger, UsageRecord};

const RECORDS: usize = 2_000;

/// Ids and times grow across iterations, as they do in a running server
/// (generated ids start with a timestamp).
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn record(_: usize) -> UsageRecord {
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    UsageRecord {
        request_id: format!("bench-{i:016x}"),
        response_id: format!("cmpl-{i:016x}"),
        tenant: format!("tenant-{}", i % 8),
        key_id: Some("key-1".into()),
        model: "smollm2-135m-instruct".into(),
        feature: Some("search".into()),
        route: "chat".into(),
        prompt_tokens: 40,
        cached_prompt_tokens: 16,
        completion_tokens: 120,
        finish_reason: "stop".into(),
        outcome: "completed".into(),
        queue_seconds: Some(0.002),
        ttft_seconds: Some(0.06),
        total_seconds: 1.2,
        ts_ms: 1_795_564_800_000 + i as i64,
        cost_usd: Some(0.000_012),
        prompt_text: None,
        completion_text: None,
    }
}

fn open(name: &str, durability: Durability) -> Arc<Ledger> {
    let dir = std::env::temp_dir().join(format!("inferd-bench-ledger-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Arc::new(Ledger::open(&dir.join("usage.db"), durability).expect("ledger opens"))
}

/// `RECORDS` records from `writers` threads, each waiting for its commit.
fn waited(ledger: &Arc<Ledger>, writers: usize) {
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                for i in (w..RECORDS).step_by(writers) {
                    ledger.write(record(i)).expect("queued").blocking_recv().expect("committed");
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().expect("writer thread"));
}

fn write_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("ledger/records");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(10);
    for (name, durability) in [("process", Durability::Process), ("full", Durability::Full)] {
        let ledger = open(name, durability);
        for writers in [1usize, 16, 64] {
            group.bench_with_input(
                BenchmarkId::new(format!("waited_{name}"), writers),
                &writers,
                |b, &writers| b.iter(|| waited(&ledger, writers)),
            );
        }
    }
    let pg = inferd_ledger::testing::Postgres::start_durable();
    let ledger = Arc::new(
        Ledger::connect_postgres(&pg.url(), std::time::Duration::from_secs(10))
            .expect("PostgreSQL ledger opens"),
    );
    for writers in [1usize, 16, 64] {
        group.bench_with_input(BenchmarkId::new("waited_postgres", writers), &writers, |b, &writers| {
            b.iter(|| waited(&ledger, writers))
        });
    }
    ledger.close();
    let ledger = open("detached", Durability::Process);
    group.bench_function("detached_process", |b| {
        b.iter(|| {
            for i in 0..RECORDS - 1 {
                ledger.write_detached(record(i)).expect("queued");
            }
            // The last one waits, so the iteration ends once all are on disk.
            ledger.write(record(RECORDS)).expect("queued").blocking_recv().expect("committed");
        })
    });
    group.finish();
}

criterion_group!(benches, write_throughput);
criterion_main!(benches);
