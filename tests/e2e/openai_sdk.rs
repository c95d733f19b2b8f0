//! The official `openai` Python package against the server, streaming
//! included, on both routes. `make test` installs it into .venv (pinned).

use std::process::Command;

use crate::api::server;
use crate::harness::workspace;

/// Runs `tests/<script>` with .venv's Python and `args`; its stdout, after
/// checking it exited 0 and printed `passed` (the script's last line).
pub fn run_python(script: &str, args: &[&str], passed: &str) -> String {
    let python = workspace().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make venv` (make test does it)", python.display());
    let out = Command::new(python)
        .arg(workspace().join("tests").join(script))
        .args(args)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(passed), "{stdout}");
    stdout
}

#[test]
fn official_python_client_works_on_both_routes() {
    run_python("openai_client.py", &[&format!("{}/v1", server().base)], "all openai client checks passed");
}
