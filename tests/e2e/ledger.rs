//! The usage ledger on disk: records of completed requests survive
//! `kill -9`, and prompts stay out of logs and the ledger unless a tenant
//! opts in.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::api::client;
use crate::harness::{Server, temp_dir};
use crate::tenants::{call, tenant, write_config};

fn open_ledger(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("the ledger opens")
}

/// One request; true when its whole response arrived.
async fn one_request(base: &str, id: &str, stream: bool, max_tokens: u32) -> bool {
    let body = json!({"prompt": format!("Request {id} says"), "max_tokens": max_tokens, "stream": stream});
    let sent = client()
        .post(format!("{base}/v1/completions"))
        .header("X-Request-Id", id)
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    let Ok(resp) = sent else { return false };
    if resp.status() != 200 {
        return false;
    }
    match resp.text().await {
        Ok(text) if stream => text.ends_with("data: [DONE]\n\n"),
        Ok(text) => serde_json::from_str::<Value>(&text).is_ok_and(|v| v["usage"].is_object()),
        Err(_) => false,
    }
}

#[tokio::test]
async fn records_of_completed_requests_survive_kill_9() {
    let dir = temp_dir("kill9");
    let ledger = dir.join("usage.db");
    let mut srv = Server::start(&["--ledger", ledger.to_str().unwrap()]);
    let completed = Arc::new(Mutex::new(Vec::<String>::new()));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let base = srv.base.clone();
            let (completed, killed) = (completed.clone(), killed.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("k9-{w}-{i}");
                    if one_request(&base, &id, (w + i) % 2 == 0, 2 + (i % 7) as u32).await {
                        completed.lock().unwrap().push(id);
                    } else if killed.load(std::sync::atomic::Ordering::SeqCst) {
                        return; // the server is gone
                    }
                }
            })
        })
        .collect();
    // Kill it mid-load, with requests in flight, once enough have completed
    // (waiting on state, not on time: a loaded machine is only slower).
    let until = Instant::now() + Duration::from_secs(120);
    while completed.lock().unwrap().len() < 12 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    srv.signal(libc::SIGKILL);
    assert!(srv.wait_exit(Duration::from_secs(10)).is_some(), "killed");
    for w in workers {
        w.await.unwrap();
    }
    let completed = completed.lock().unwrap().clone();
    assert!(completed.len() >= 10, "the load ran: {} completed", completed.len());

    let conn = open_ledger(&ledger);
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let ids: HashSet<String> = conn
        .prepare("SELECT request_id FROM usage")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let missing: Vec<_> = completed.iter().filter(|id| !ids.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} completed requests have no record: {missing:?}",
        missing.len(),
        completed.len()
    );
    drop(conn);

    // The server starts again on the same file and serves its summary.
    let srv = Server::start(&["--ledger", ledger.to_str().unwrap()]);
    let (status, _, usage) = call(&srv, None, "/v1/usage", None).await;
    assert_eq!(status, 200, "{usage}");
    assert!(usage["totals"]["requests"].as_u64().unwrap() >= completed.len() as u64);
    let ready: Value = client().get(srv.url("/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["ledger"], "ok");
}

/// Every byte of the ledger's files (database and write-ahead log).
fn ledger_bytes(path: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal"] {
        let p = format!("{}{suffix}", path.display());
        if let Ok(b) = std::fs::read(p) {
            all.extend(b);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn prompts_reach_no_log_line_and_no_ledger_row_by_default() {
    let dir = temp_dir("privacy");
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let srv = Server::start_logged(&["--log-format", "json"], &[("INFERD_LOG", "debug")], log);
    let marker = "quokka-zanzibar-4471";
    let (status, _, _) = call(
        &srv,
        None,
        "/v1/completions",
        Some(json!({"prompt": format!("Tell {marker} a joke"), "max_tokens": 4})),
    )
    .await;
    assert_eq!(status, 200);
    let chat = json!({"messages": [{"role": "user", "content": format!("Who is {marker}?")}], "max_tokens": 4, "stream": true});
    let text = client()
        .post(srv.url("/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("[DONE]"));
    // A bad request echoes nothing of the prompt into logs either.
    call(&srv, None, "/v1/completions", Some(json!({"prompt": format!("{marker}"), "max_tokens": -1}))).await;
    let rows: i64 =
        open_ledger(&srv.ledger).query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 2, "both requests are metered");
    let ledger = srv.ledger.clone();
    drop(srv);
    let log = std::fs::read(&log_path).unwrap();
    assert!(log.len() > 100, "the server logged something");
    assert!(!contains(&log, marker), "the prompt is in the log");
    let bytes = ledger_bytes(&ledger);
    assert!(contains(&bytes, "smollm2-135m-instruct"), "the ledger's records are in these bytes");
    assert!(!contains(&bytes, marker), "the prompt is in the ledger");
}

#[tokio::test]
async fn opted_in_tenants_keep_redacted_prompts_and_keys_stay_out_of_logs() {
    let dir = temp_dir("keeper");
    let config = write_config(&dir, &[tenant("keeper", "log_prompts = true"), tenant("quiet", "")]);
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let srv = Server::start_logged(&["--config", &config], &[("INFERD_LOG", "debug")], log);
    let marker = "wombat-kestrel-9902";
    let prompt = format!("{marker}: write to jane.doe@example.com or call +1 415 555 2671");
    for t in ["keeper", "quiet"] {
        let (status, _, body) =
            call(&srv, Some(t), "/v1/completions", Some(json!({"prompt": prompt, "max_tokens": 3}))).await;
        assert_eq!(status, 200, "{body}");
    }
    let conn = open_ledger(&srv.ledger);
    let kept: Option<String> =
        conn.query_row("SELECT prompt_text FROM usage WHERE tenant = 'keeper'", [], |r| r.get(0)).unwrap();
    let kept = kept.expect("the opted-in tenant's prompt is kept");
    assert!(kept.contains(marker) && kept.contains("[EMAIL]") && kept.contains("[PHONE]"), "{kept}");
    assert!(!kept.contains("jane.doe") && !kept.contains("555"), "{kept}");
    let (quiet_prompt, quiet_completion, key_id): (Option<String>, Option<String>, String) = conn
        .query_row("SELECT prompt_text, completion_text, key_id FROM usage WHERE tenant = 'quiet'", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!((quiet_prompt, quiet_completion), (None, None));
    assert_eq!(key_id, "quiet-key", "the key's id, never the key");
    drop(conn);
    drop(srv);
    let log = std::fs::read(&log_path).unwrap();
    assert!(!contains(&log, marker));
    for key in ["key-keeper", "key-quiet"] {
        assert!(!contains(&log, key), "{key} is in the log");
    }
}

#[tokio::test]
async fn records_past_retention_are_deleted_and_newer_ones_kept() {
    let dir = temp_dir("retention");
    let ledger = dir.join("usage.db");
    let path = ledger.to_str().unwrap();
    let srv = Server::start(&["--ledger", path]);
    for i in 0..2 {
        let (status, _, _) =
            call(&srv, None, "/v1/completions", Some(json!({"prompt": format!("Old {i}"), "max_tokens": 2})))
                .await;
        assert_eq!(status, 200);
    }
    drop(srv);
    // Age one record by three days.
    let conn = open_ledger(&ledger);
    let aged = conn.execute("UPDATE usage SET ts_ms = ts_ms - 3 * 86400000 WHERE id = 1", []).unwrap();
    assert_eq!(aged, 1);
    drop(conn);
    let srv = Server::start(&["--ledger", path, "--ledger-retention-days", "2"]);
    let mut count = -1;
    for _ in 0..100 {
        count = open_ledger(&ledger).query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0)).unwrap();
        if count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count, 1, "the three-day-old record is gone, the new one stays");
    let id: i64 = open_ledger(&ledger).query_row("SELECT id FROM usage", [], |r| r.get(0)).unwrap();
    assert_eq!(id, 2);
    drop(srv);
}

#[tokio::test]
async fn a_failing_ledger_is_reported_and_loses_nothing_once_repaired() {
    let srv = Server::start(&[]);
    let ask = |i: u32| {
        let url = srv.url("/v1/completions");
        async move {
            let body = json!({"prompt": format!("Item {i}"), "max_tokens": 2});
            client().post(url).json(&body).send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(ask(0).await, 200);
    // Break the ledger under the server: its inserts now fail.
    let conn = open_ledger(&srv.ledger);
    conn.execute_batch("ALTER TABLE usage RENAME TO usage_moved").unwrap();
    // Requests are still served (the first waits out its commit, the rest do not wait).
    for i in 1..4 {
        assert_eq!(ask(i).await, 200);
    }
    let ready: Value = client().get(srv.url("/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!((ready["status"].as_str(), ready["ledger"].as_str()), (Some("ready"), Some("failing")));
    let metrics = client().get(srv.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "inferd_ledger_failing 1"), "{metrics}");
    // Repaired: the kept records are written by the writer's retries.
    conn.execute_batch("ALTER TABLE usage_moved RENAME TO usage").unwrap();
    let mut rows = 0;
    for _ in 0..200 {
        rows = conn.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get::<_, i64>(0)).unwrap();
        if rows == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows, 4, "no record was lost");
    let ready: Value = client().get(srv.url("/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["ledger"], "ok");
}
