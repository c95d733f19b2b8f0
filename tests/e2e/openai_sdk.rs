//! The official `openai` Python package against the server, streaming
//! included, on both routes. `make test` installs it into .venv (pinned).

use std::process::Command;

use crate::api::server;
use crate::harness::workspace;

#[test]
fn official_python_client_works_on_both_routes() {
    let python = workspace().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make venv` (make test does it)", python.display());
    let out = Command::new(python)
        .arg(workspace().join("tests/openai_client.py"))
        .arg(format!("{}/v1", server().base))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all openai client checks passed"), "{stdout}");
}
