//! The console at `/`: its files, the history it charts (`/stats/recent`),
//! and the whole page in Debian's Chromium, driven by Playwright
//! (tests/console_browser.py; `make browser` installs both).

use std::path::Path;

use serde_json::{Value, json};

use crate::api::{client, server};
use crate::harness::{Server, temp_dir, workspace};
use crate::openai_sdk::run_python;
use crate::tenants::{tenant, write_config};

/// Width and height of a PNG, from its IHDR chunk, after checking the
/// signature and that the file ends with its IEND chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    assert!(bytes.ends_with(b"IEND\xae\x42\x60\x82"), "the PNG is cut short");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[tokio::test]
async fn the_page_and_its_files_are_served_with_a_strict_policy() {
    let srv = server();
    let resp = client().get(srv.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = resp.text().await.unwrap();
    assert!(html.contains("<title>inferd console</title>"));
    for (path, kind) in [("/console/console.js", "text/javascript"), ("/console/console.css", "text/css")] {
        let resp = client().get(srv.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with(kind), "{path}");
    }
}

#[tokio::test]
async fn recent_history_counts_tokens_latencies_and_refusals() {
    let srv = server();
    let before: Value = client().get(srv.url("/stats/recent")).send().await.unwrap().json().await.unwrap();
    let resp = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "Count: one, two,", "max_tokens": 6, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    // A refusal: an out-of-range parameter.
    let resp = client()
        .post(srv.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 4, "temperature": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let after: Value = client().get(srv.url("/stats/recent")).send().await.unwrap().json().await.unwrap();
    let slots = after["slots"].as_array().unwrap();
    assert_eq!(
        slots.len() as u64,
        after["window_seconds"].as_u64().unwrap() / after["slot_seconds"].as_u64().unwrap()
    );
    let w = |v: &Value, k: &str| v["window"][k].as_u64().unwrap_or(0);
    // Other tests share this server: at least our tokens and refusal arrived.
    assert!(w(&after, "output_tokens") >= w(&before, "output_tokens") + completion, "{after}");
    assert!(w(&after, "requests_finished") > w(&before, "requests_finished"));
    let refused = |v: &Value| v["rejections_total"]["invalid_request"].as_u64().unwrap_or(0);
    assert!(refused(&after) > refused(&before), "{after}");
    let ttft = &after["window"]["ttft"];
    assert!(ttft["count"].as_u64().unwrap() >= 1);
    let (p50, p99) = (ttft["p50_ms"].as_f64().unwrap(), ttft["p99_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99, "{ttft}");
    // The slots add up to the window.
    let sum: u64 = slots.iter().map(|s| s["output_tokens"].as_u64().unwrap()).sum();
    assert_eq!(sum, w(&after, "output_tokens"));
}

#[test]
fn the_console_in_a_real_browser() {
    let dir = temp_dir("console");
    let config = write_config(&dir, &[tenant("console-admin", "admin = true"), tenant("console-user", "")]);
    let srv = Server::start(&["--config", &config, "--instance-hourly-cost", "2.5"]);
    let chromium = std::env::var("INFERD_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "{chromium} is missing: run `make browser` (make test does it)");
    let artifacts = workspace().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("console.png");
    let _ = std::fs::remove_file(&shot);
    let out = run_python(
        "console_browser.py",
        &[&srv.base, "key-console-admin", shot.to_str().unwrap()],
        "all console checks passed",
    );
    println!("{out}");
    // A full-page screenshot: the viewport's width, at least its height.
    let (width, height) = png_size(&shot);
    assert_eq!(width, 1280);
    assert!(height >= 900, "{height}");
}

#[test]
fn a_model_that_failed_to_load_is_named_on_the_page_with_its_reason() {
    // A Hub model that is not cached, offline: it fails, the default serves.
    let srv = Server::start_with_env(
        &["--model", "smollm2-135m-instruct", "--model", "someorg/not-cached"],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", temp_dir("console-hf").to_str().unwrap())],
    );
    run_python(
        "console_browser.py",
        &["--failed-model", &srv.base, "someorg/not-cached"],
        "all console checks passed",
    );
}
