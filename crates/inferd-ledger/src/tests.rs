use super::*;

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("inferd-ledger-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("usage.db")
}

fn record(i: u64, tenant: &str, model: &str, feature: Option<&str>, ts_ms: i64) -> UsageRecord {
    UsageRecord {
        request_id: format!("req-{i}"),
        response_id: format!("cmpl-{i}"),
        tenant: tenant.into(),
        key_id: Some(format!("{tenant}-key")),
        model: model.into(),
        feature: feature.map(String::from),
        route: "chat".into(),
        prompt_tokens: 10 + i,
        cached_prompt_tokens: i % 3,
        completion_tokens: 2 * i,
        finish_reason: "stop".into(),
        outcome: "completed".into(),
        queue_seconds: Some(0.01),
        ttft_seconds: Some(0.05),
        total_seconds: 0.5,
        ts_ms,
        cost_usd: Some(0.001),
        prompt_text: None,
        completion_text: None,
    }
}

fn block<T>(rx: oneshot::Receiver<T>) -> T {
    rx.blocking_recv().expect("the writer answers")
}

fn everything() -> UsageQuery {
    UsageQuery { start_ms: 0, end_ms: i64::MAX, ..Default::default() }
}

/// Runs `check` on a fresh SQLite ledger and on a fresh PostgreSQL one:
/// the two stores answer the same queries the same way.
fn on_both_stores(name: &str, check: impl Fn(&Ledger)) {
    check(&Ledger::open(&temp_path(name), Durability::Process).unwrap());
    let pg = testing::Postgres::start();
    check(&Ledger::connect_postgres(&pg.url(), Duration::from_secs(10)).unwrap());
}

const DAY_MS: i64 = 86_400_000;

#[test]
fn records_are_committed_and_summarized_by_group() {
    on_both_stores("summary", records_are_summarized_by_group);
}

fn records_are_summarized_by_group(ledger: &Ledger) {
    let mut waits = Vec::new();
    for i in 0..6 {
        let (tenant, model) = if i % 2 == 0 { ("a", "m1") } else { ("b", "m2") };
        let feature = if i < 3 { Some("search") } else { None };
        waits.push(ledger.write(record(i, tenant, model, feature, DAY_MS * (i as i64 / 4) + 1)).unwrap());
    }
    waits.into_iter().for_each(block);
    let total = ledger.summary(&everything()).unwrap();
    assert_eq!(total.rows.len(), 1);
    assert_eq!(total.rows[0].requests, 6);
    assert_eq!(total.rows[0].prompt_tokens, (0..6).map(|i| 10 + i).sum::<u64>());
    assert_eq!(total.rows[0].completion_tokens, (0..6).map(|i| 2 * i).sum::<u64>());

    let q = UsageQuery {
        start_ms: 0,
        end_ms: i64::MAX,
        tenant: Some("a".into()),
        group_by: vec![GroupBy::Day, GroupBy::Feature],
    };
    let rows = ledger.summary(&q).unwrap().rows;
    let keys: Vec<_> = rows.iter().map(|r| (r.keys.clone(), r.requests)).collect();
    assert_eq!(
        keys,
        vec![
            (vec!["1970-01-01".to_string(), "search".to_string()], 2),
            (vec!["1970-01-02".to_string(), "".to_string()], 1)
        ]
    );
    // The window is half-open: records ending at end_ms are left out.
    let q = UsageQuery { start_ms: 0, end_ms: 1, ..Default::default() };
    assert_eq!(ledger.summary(&q).unwrap().rows[0].requests, 0);
    let used = ledger.tokens_by_tenant_since(DAY_MS).unwrap();
    assert_eq!(used.get("a"), Some(&(14 + 8)));
    assert_eq!(used.get("b"), Some(&(15 + 10)));
}

#[test]
fn feedback_rates_only_the_tenants_own_request_and_the_last_rating_wins() {
    on_both_stores("feedback", feedback_rates_the_tenants_own_request);
}

fn feedback_rates_the_tenants_own_request(ledger: &Ledger) {
    block(ledger.write(record(1, "a", "m1", None, 5)).unwrap());
    block(ledger.write(record(2, "a", "m1", None, 5)).unwrap());
    let rate = |tenant: &str, id: &str, rating| block(ledger.feedback(tenant, id, rating, None, 9).unwrap());
    assert_eq!(rate("b", "req-1", Rating::Up), None, "another tenant's request");
    assert_eq!(rate("a", "nope", Rating::Up), None);
    assert_eq!(rate("a", "req-1", Rating::Down).as_deref(), Some("m1"));
    assert_eq!(rate("a", "cmpl-1", Rating::Up).as_deref(), Some("m1"), "by response id too");
    assert_eq!(rate("a", "req-2", Rating::Down).as_deref(), Some("m1"));
    let q = UsageQuery { start_ms: 0, end_ms: 10, group_by: vec![GroupBy::Model], ..Default::default() };
    let row = ledger.summary(&q).unwrap().rows.remove(0);
    assert_eq!((row.thumbs_up, row.thumbs_down), (1, 1));
    assert_eq!(row.thumbs_up_share(), Some(0.5));
}

#[test]
fn prune_deletes_only_records_older_than_the_cutoff() {
    on_both_stores("prune", prune_deletes_older_records);
}

fn prune_deletes_older_records(ledger: &Ledger) {
    for (i, ts) in [(1, 10), (2, 20), (3, 30)] {
        block(ledger.write(record(i, "a", "m", None, ts)).unwrap());
    }
    assert_eq!(block(ledger.prune(25).unwrap()), 2);
    let q = UsageQuery { start_ms: 0, end_ms: 100, group_by: vec![GroupBy::Key], ..Default::default() };
    let rows = ledger.summary(&q).unwrap().rows;
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].keys[0].as_str(), rows[0].requests), ("a-key", 1));
}

#[test]
fn a_failing_commit_is_retried_with_its_records_kept() {
    let path = temp_path("failing");
    let ledger = Ledger::open(&path, Durability::Process).unwrap();
    block(ledger.write(record(1, "a", "m", None, 1)).unwrap());
    // Someone breaks the file under the writer: its inserts fail.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("ALTER TABLE usage RENAME TO usage_moved").unwrap();
    let mut done = ledger.write(record(2, "a", "m", None, 2)).unwrap();
    let stats = ledger.stats();
    let until = Instant::now() + Duration::from_secs(5);
    while !stats.failing.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(stats.failing.load(Ordering::Relaxed), "the failure is reported");
    assert!(stats.errors.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.pending.load(Ordering::Relaxed), 1, "the record is kept");
    assert!(done.try_recv().is_err(), "not acknowledged while not committed");
    // Repaired: the kept record is committed on a retry.
    other.execute_batch("ALTER TABLE usage_moved RENAME TO usage").unwrap();
    block(done);
    assert!(!stats.failing.load(Ordering::Relaxed));
    let q = UsageQuery { start_ms: 0, end_ms: 10, ..Default::default() };
    assert_eq!(ledger.summary(&q).unwrap().rows[0].requests, 2);
}

#[test]
fn concurrent_writers_lose_nothing_and_the_file_reopens_clean() {
    let path = temp_path("concurrent");
    {
        let ledger = Arc::new(Ledger::open(&path, Durability::Process).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ledger = ledger.clone();
                std::thread::spawn(move || {
                    for i in 0..250 {
                        let r = record(t * 1000 + i, "a", "m", None, 1);
                        if i % 2 == 0 {
                            block(ledger.write(r).unwrap());
                        } else {
                            ledger.write_detached(r).unwrap();
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        ledger.close();
        assert_eq!(ledger.stats().records_written.load(Ordering::Relaxed), 2000);
        assert!(matches!(ledger.write_detached(record(0, "a", "m", None, 1)), Err(LedgerError::Stopped)));
    }
    let ledger = Ledger::open(&path, Durability::Full).unwrap();
    let q = UsageQuery { start_ms: 0, end_ms: 2, ..Default::default() };
    assert_eq!(ledger.summary(&q).unwrap().rows[0].requests, 2000);
    assert_eq!(integrity_check(&Connection::open(&path).unwrap()).unwrap(), "ok");
}

#[test]
fn records_that_arrive_together_share_a_commit() {
    let path = temp_path("group-commit");
    let ledger = Ledger::open(&path, Durability::Process).unwrap();
    // Another connection holds the write lock, so the writer's first
    // commit waits while everything else queues behind it.
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let n = 1000;
    for i in 0..n {
        ledger.write_detached(record(i, "a", "m", None, 1)).unwrap();
    }
    blocker.execute_batch("COMMIT").unwrap();
    ledger.close();
    let stats = ledger.stats();
    assert_eq!(stats.records_written.load(Ordering::Relaxed), n);
    let commits = stats.commits.load(Ordering::Relaxed);
    // The first record alone, then the rest in batches of MAX_BATCH.
    let most = 1 + (n as usize - 1).div_ceil(MAX_BATCH) as u64;
    assert!(commits <= most, "{commits} commits for {n} records (at most {most} expected)");
}

#[test]
fn an_empty_ledger_summarizes_to_one_zero_row_on_both_stores() {
    on_both_stores("empty", |ledger| {
        let rows = ledger.summary(&everything()).unwrap().rows;
        assert_eq!(rows, vec![SummaryRow::default()]);
        let q = UsageQuery { group_by: vec![GroupBy::Tenant], ..everything() };
        assert!(ledger.summary(&q).unwrap().rows.is_empty());
        assert!(ledger.tokens_by_tenant_since(0).unwrap().is_empty());
    });
}

#[test]
fn postgres_down_keeps_records_in_memory_and_commits_them_once_when_it_returns() {
    let mut pg = testing::Postgres::start();
    let ledger = Ledger::connect_postgres(&pg.url(), Duration::from_secs(10)).unwrap();
    block(ledger.write(record(1, "a", "m", None, 1)).unwrap());
    pg.stop();
    ledger.set_max_backlog(3);
    let waits: Vec<_> = (2..6).map(|i| ledger.write(record(i, "a", "m", None, 1)).unwrap()).collect();
    let stats = ledger.stats();
    let until = Instant::now() + Duration::from_secs(30);
    while !stats.failing.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(stats.failing.load(Ordering::Relaxed), "the failure is reported");
    assert_eq!(stats.pending.load(Ordering::Relaxed), 4, "the records are kept");
    assert!(ledger.backlog_full(), "4 queued against a bound of 3");
    assert!(ledger.summary(&everything()).is_err(), "reads fail while the database is down");
    pg.resume();
    waits.into_iter().for_each(block);
    assert!(!stats.failing.load(Ordering::Relaxed));
    assert!(!ledger.backlog_full());
    assert_eq!(ledger.summary(&everything()).unwrap().rows[0].requests, 5, "each record once");
}

#[test]
fn a_repeated_postgres_commit_inserts_each_record_once() {
    // What a retry does after a commit whose acknowledgement was lost with
    // its connection: the same batch again.
    let pg = testing::Postgres::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let store = postgres::Store::new(&pg.url(), runtime.handle().clone()).unwrap();
    store.migrate(Duration::from_secs(10)).unwrap();
    store.migrate(Duration::from_secs(10)).expect("a second migration changes nothing");
    let mut sink = store.sink();
    let batch: Vec<Op> = (0..3)
        .map(|i| Op::Record { record: Box::new(record(i, "a", "m", None, 1)), seq: i, done: None })
        .collect();
    sink.commit(&batch).unwrap();
    sink.commit(&batch).unwrap();
    assert_eq!(store.reader().summary(&everything()).unwrap().rows[0].requests, 3);
    // Another instance's records with the same sequence numbers are others.
    store.sink().commit(&batch).unwrap();
    assert_eq!(store.reader().summary(&everything()).unwrap().rows[0].requests, 6);
}

#[test]
fn closing_while_postgres_stays_down_gives_up_after_the_grace_and_counts_the_loss() {
    let mut pg = testing::Postgres::start();
    let ledger = Ledger::connect_postgres(&pg.url(), Duration::from_secs(10)).unwrap();
    pg.stop();
    for i in 0..3 {
        ledger.write_detached(record(i, "a", "m", None, 1)).unwrap();
    }
    let started = Instant::now();
    ledger.close_within(Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(20), "close returned: {:?}", started.elapsed());
    let stats = ledger.stats();
    assert_eq!(stats.lost.load(Ordering::Relaxed), 3);
    assert_eq!(stats.pending.load(Ordering::Relaxed), 0);
    assert_eq!(stats.records_written.load(Ordering::Relaxed), 0);
}

#[test]
fn a_postgres_target_is_shown_without_its_password() {
    let t = Target::parse("postgres://inferd:s3cret@db.internal:5433/usage?connect_timeout=3");
    assert!(matches!(t, Target::Postgres(_)));
    assert_eq!(t.to_string(), "postgres://inferd@db.internal:5433/usage");
    assert!(!format!("{t:?}").contains("s3cret"));
    assert!(!Target::parse("postgresql://u:pw@h/db").to_string().contains("pw"));
    assert_eq!(Target::parse("data/usage.db"), Target::Sqlite("data/usage.db".into()));
}
