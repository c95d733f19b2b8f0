//! `inferd bench serve` against a running inferd: its JSON parses, its
//! token counts are what the server metered, its plots are PNGs of the
//! stated size, and a failing target is reported, not hidden.

use std::process::Command;

use serde_json::Value;

use crate::harness::{Server, temp_dir, wait_idle};

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inferd"))
        .arg("bench")
        .arg("serve")
        .args(args)
        .output()
        .expect("inferd bench runs")
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

#[tokio::test]
async fn bench_serve_measures_what_the_server_metered() {
    let srv = Server::start(&[]);
    let before = wait_idle(&srv).await;
    let dir = temp_dir("bench");
    let json = dir.join("runs.jsonl");
    let plots = dir.join("plots");
    let out = bench(&[
        "--base-url",
        &srv.base,
        "--concurrency",
        "1,3",
        "--num-prompts",
        "2,5",
        "--input-len",
        "24",
        "--output-len",
        "6",
        "--warmup",
        "0",
        "--goodput",
        "ttft:600000",
        "--label",
        "e2e",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plots.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("c=1") && stdout.contains("c=3") && stdout.contains("out tok/s"), "{stdout}");

    let runs: Vec<Value> =
        std::fs::read_to_string(&json).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(runs.len(), 2, "one object per run");
    for (run, (c, n)) in runs.iter().zip([(1, 2), (3, 5)]) {
        assert_eq!(run["schema"], "inferd-bench-serve/1");
        assert_eq!(run["model"], "smollm2-135m-instruct", "the model /v1/models lists first");
        assert_eq!(
            (run["load"]["mode"].as_str(), run["load"]["concurrency"].as_u64()),
            (Some("concurrency"), Some(c))
        );
        assert_eq!(run["requests"]["ok"], n);
        assert_eq!(run["requests"]["by_status"]["200"], n);
        // ignore_eos and token-id prompts: exact lengths, as the server counts them.
        assert_eq!(run["output_tokens"], 6 * n);
        assert_eq!(run["input_tokens"], 24 * n);
        assert_eq!(run["ttft_ms"]["count"], n);
        assert_eq!(run["itl_ms"]["count"], 5 * n, "five gaps after the first of six tokens");
        for d in ["ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"] {
            let q: Vec<f64> =
                ["p50", "p90", "p99", "max"].iter().map(|f| run[d][*f].as_f64().unwrap()).collect();
            assert!(q[0] > 0.0 && q.windows(2).all(|w| w[0] <= w[1]), "{d}: {q:?}");
        }
        assert!(run["e2e_ms"]["p50"].as_f64().unwrap() > run["ttft_ms"]["p50"].as_f64().unwrap());
        assert!(run["throughput"]["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(run["goodput"]["fraction"], 1.0);
        // inferd's own counters over the run, read from /stats.
        assert_eq!(run["server"]["generated_tokens"], 6 * n);
        assert!(run["server"]["engine_step_s"].as_f64().unwrap() > 0.0);
        assert!(run["server"]["engine_steps"].as_u64().unwrap() >= 6);
    }
    let after = wait_idle(&srv).await;
    let metered = after["generated_tokens"].as_u64().unwrap() - before["generated_tokens"].as_u64().unwrap();
    assert_eq!(metered, 6 * 7, "the server generated what the bench counted");

    for (name, _) in [("throughput_latency.png", ()), ("latency_distribution.png", ())] {
        let bytes = std::fs::read(plots.join(name)).unwrap();
        assert_eq!(png_size(&bytes), (1200, 500), "{name}");
        assert!(bytes.len() > 10_000, "{name} has content: {} bytes", bytes.len());
    }

    // --compare of a file with itself: every ratio is 1.
    let out = bench(&["--compare", json.to_str().unwrap(), json.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let ratios: Vec<&str> =
        table.lines().filter(|l| l.starts_with("c=")).filter_map(|l| l.split_whitespace().last()).collect();
    assert!(!ratios.is_empty() && ratios.iter().all(|r| *r == "1.00" || *r == "-"), "{table}");

    // A model the server does not have: every request fails, the run says
    // why by status, and the exit status is not 0.
    let out = bench(&[
        "--base-url",
        &srv.base,
        "--model",
        "no-such-model",
        "--num-prompts",
        "2",
        "--output-len",
        "2",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("every request of c=1 failed"));
    let run: Value =
        serde_json::from_str(std::fs::read_to_string(&json).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(
        (run["requests"]["failed"].as_u64(), run["requests"]["by_status"]["404"].as_u64()),
        (Some(2), Some(2))
    );
}
