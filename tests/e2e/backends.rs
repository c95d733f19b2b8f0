//! Choosing a backend: `--device`, `--dtype` and `--kv-cache-dtype`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Server, temp_dir, workspace};

/// Runs `inferd serve` with `flags`, expecting it to exit on its own; its
/// exit status and what it wrote to stderr.
fn serve_expecting_exit(flags: &[&str]) -> (std::process::ExitStatus, String) {
    let ledger = temp_dir("backend").join("usage.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferd"))
        .current_dir(workspace())
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--ledger"])
        .arg(&ledger)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("inferd starts");
    let until = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("inferd serve {flags:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr).expect("stderr");
    (status, stderr)
}

#[test]
fn backends_missing_from_the_build_or_their_worker_are_refused_saying_why() {
    for device in ["cuda", "cuda:1"] {
        let (status, stderr) = serve_expecting_exit(&["--device", device]);
        assert!(!status.success(), "--device {device} must not start");
        assert!(stderr.contains("`cuda`") && stderr.contains("--features"), "--device {device}: {stderr}");
    }
    let (status, stderr) = serve_expecting_exit(&["--device", "neuron"]);
    assert!(!status.success());
    assert!(stderr.contains("--neuron-model-dir"), "{stderr}");
    // A worker speaking another protocol version stops the start with a clear error.
    let dir = crate::neuron::compiled_dir();
    let worker = format!("{} neuron-standin --claim-protocol 0", env!("CARGO_BIN_EXE_inferd"));
    let flags =
        ["--device", "neuron", "--neuron-model-dir", dir.to_str().unwrap(), "--neuron-worker", &worker];
    let (status, stderr) = serve_expecting_exit(&flags);
    assert!(!status.success());
    assert!(stderr.contains("the worker speaks protocol 0, inferd speaks 1"), "{stderr}");
    let (status, stderr) = serve_expecting_exit(&["--device", "tpu"]);
    assert!(!status.success());
    assert!(stderr.contains("unknown device \"tpu\""), "{stderr}");
}

#[tokio::test]
async fn the_cpu_backend_computes_in_the_dtype_asked_for() {
    let srv = Server::start(&["--dtype", "bf16"]);
    let stats: Value = reqwest::get(srv.url("/stats")).await.unwrap().json().await.unwrap();
    let backend = &stats["backend"];
    assert_eq!(backend["device"], "cpu");
    assert_eq!(backend["compute_dtype"], "bf16");
    assert_eq!(backend["kv_cache_dtype"], "bf16", "the KV cache follows the compute dtype");
    assert_eq!(backend["samples_on_device"], false);
    // Not France: for that question this model's first token is a near tie
    // ("The" leads "L" by 0.08 in f32 logits), so Q8_0 rounding decides
    // between "The capital of France is Paris." and a French ramble.
    let body = json!({
        "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
        "max_tokens": 12, "temperature": 0
    });
    let resp = reqwest::Client::new().post(srv.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let out: Value = resp.json().await.unwrap();
    let text = out["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(text.contains("Berlin"), "bf16 compute answers sensibly: {text:?}");
    drop(srv);
    // The default on the CPU: f32 compute over an f16 cache; either can be asked for.
    for (flags, kv) in [(&[][..], "f16"), (&["--kv-cache-dtype", "f32"][..], "f32")] {
        let srv = Server::start(flags);
        let stats: Value = reqwest::get(srv.url("/stats")).await.unwrap().json().await.unwrap();
        assert_eq!(
            (stats["backend"]["compute_dtype"].as_str(), stats["backend"]["kv_cache_dtype"].as_str()),
            (Some("f32"), Some(kv)),
            "{flags:?}"
        );
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().expect("command runs")
}

#[test]
fn the_cuda_launcher_explains_a_missing_driver() {
    let dir = temp_dir("launcher");
    let launcher = workspace().join("scripts/inferd-cuda");
    let has_driver =
        String::from_utf8_lossy(&run(Command::new("ldconfig").arg("-p")).stdout).contains("libcuda.so.1");
    // A program linked against a library with the driver's SONAME, which is
    // then taken away: what a CUDA build of inferd meets on a host without
    // the NVIDIA driver.
    std::fs::write(dir.join("stub.c"), "void cuInit(void) {}\n").unwrap();
    std::fs::write(dir.join("main.c"), "void cuInit(void);\nint main(void) { cuInit(); return 0; }\n")
        .unwrap();
    let gcc = |args: &[&str]| {
        assert!(run(Command::new("gcc").current_dir(&dir).args(args)).status.success(), "gcc {args:?}")
    };
    gcc(&["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", "libcuda.so", "stub.c"]);
    gcc(&["-o", "fake-inferd", "main.c", "-L.", "-lcuda"]);
    std::fs::remove_file(dir.join("libcuda.so")).unwrap();
    let out = run(Command::new(&launcher).arg("serve").env("INFERD_CUDA_BIN", dir.join("fake-inferd")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if has_driver {
        assert!(out.status.success(), "with a driver the launcher runs the binary: {stderr}");
    } else {
        assert_eq!(out.status.code(), Some(127), "{stderr}");
        assert!(stderr.contains("libcuda.so.1") && stderr.contains("NVIDIA driver"), "{stderr}");
    }
    // A binary whose libraries are all there is run with its arguments.
    let out = run(Command::new(&launcher).args(["serve", "--port", "0"]).env("INFERD_CUDA_BIN", "/bin/echo"));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "serve --port 0");
}
