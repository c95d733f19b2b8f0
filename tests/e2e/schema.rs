//! The OpenAPI document is served, and schemathesis (from PyPI, installed
//! by `make venv`) fuzzes the live server from it: no 5xx, no response that
//! contradicts the document, no panic in the server's log.

use std::process::Command;

use serde_json::Value;

use crate::api::client;
use crate::harness::{Server, temp_dir, workspace};

#[tokio::test]
async fn the_openapi_document_is_served() {
    let srv = crate::api::server();
    let resp = client().get(srv.url("/openapi.json")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());
}

/// Cases per operation: a short run in `make test`; `make fuzz` sets more.
fn examples() -> String {
    std::env::var("INFERD_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "12".into())
}

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let bin = workspace().join(".venv/bin/schemathesis");
    assert!(bin.exists(), "{} is missing: run `make venv`", bin.display());
    let dir = temp_dir("schemathesis");
    let log_path = dir.join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // A short context keeps every generated request quick on a CPU.
    let srv = Server::start_logged(&["--max-model-len", "64"], &[("INFERD_LOG", "warn")], log);
    let out = Command::new(&bin)
        .current_dir(&dir)
        .arg("--config-file")
        .arg(workspace().join("tests/schemathesis.toml"))
        .args(["run", &srv.url("/openapi.json"), "--checks"])
        .arg(
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        )
        .args(["--max-examples", &examples(), "--seed", "20261130", "--workers", "1"])
        .args(["--request-timeout", "120", "--generation-database", "none", "--no-color"])
        .args(["--report", "ndjson", "--report-dir", dir.to_str().unwrap()])
        .output()
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("passed") || l.contains("failed") || l.contains("cases"))
        .collect();
    eprintln!("schemathesis summary:\n{}", summary.join("\n"));
    assert!(out.status.success(), "schemathesis failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    drop(srv);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
