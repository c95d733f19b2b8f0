//! inferd's GPU check: one command on a GPU host (scripts/gpu-check.sh runs
//! it) that prints the GPU's facts, checks the CUDA backend against the
//! host (each kernel on a mixed batch through shuffled block tables in f32,
//! f16 and bf16; whole models through the CPU and CUDA executors), and
//! benchmarks decode and prefill at three model shapes with random bf16
//! weights made on the GPU. Ends with `N passed, N failed`.
//!
//! `INFERD_GPU` picks the GPU (default 0); `--quick` skips the 8B shape.

use std::process::ExitCode;
use std::time::Instant;

use inferd_contract::DType;
use inferd_exec::cuda::{
    CheckOutcome, ForcedKernel, check_attention_kernels, check_model, check_sampling, copy_bandwidth,
    decode_bench, gpu_facts,
};
use inferd_models::LlamaConfig;

/// A llama shape: `[hidden, layers, heads, kv_heads, head_dim, ffn, vocab]`.
fn config(dims: [usize; 7], tied: bool) -> LlamaConfig {
    let [hidden, layers, heads, kv_heads, head_dim, ffn, vocab] = dims;
    LlamaConfig {
        architecture: "llama".into(),
        hidden_size: hidden,
        intermediate_size: ffn,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: tied,
        attention_bias: false,
        rope_interleaved: false,
    }
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn record(&mut self, o: &CheckOutcome) {
        let verdict = if o.passed() { "PASS" } else { "FAIL" };
        println!(
            "{verdict} {:<44} error {:>9.2e} (limit {:.0e})  {}",
            o.name, o.error, o.tolerance, o.detail
        );
        if o.passed() { self.passed += 1 } else { self.failed += 1 }
    }

    fn error(&mut self, what: &str, e: impl std::fmt::Display) {
        println!("FAIL {what}: {e}");
        self.failed += 1;
    }
}

fn main() -> ExitCode {
    let ordinal: usize = std::env::var("INFERD_GPU").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let quick = std::env::args().any(|a| a == "--quick");
    let started = Instant::now();
    let mut tally = Tally::default();
    match gpu_facts(ordinal) {
        Ok(f) => println!(
            "GPU {ordinal}: {} (sm_{}{}), {} SMs, {:.1} GiB",
            f.name,
            f.compute_capability.0,
            f.compute_capability.1,
            f.sm_count,
            f.total_memory as f64 / (1u64 << 30) as f64
        ),
        Err(e) => {
            println!("no usable GPU {ordinal}: {e}");
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    }

    println!("\n== kernels against an f64 softmax on the host");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for head_dim in [64, 128] {
            for block_size in [16, 32] {
                match check_attention_kernels(ordinal, dtype, head_dim, block_size) {
                    Ok(outcomes) => outcomes.iter().for_each(|o| tally.record(o)),
                    Err(e) => tally.error(&format!("kernels {dtype} d{head_dim} bs{block_size}"), e),
                }
            }
        }
    }

    println!("\n== sampling on the GPU against its specified distribution (= the host sampler's)");
    match check_sampling(ordinal) {
        Ok(outcomes) => outcomes.iter().for_each(|o| tally.record(o)),
        Err(e) => tally.error("sampling", e),
    }

    println!("\n== models: CPU executor (f32) against the CUDA executor");
    let tiny = config([256, 2, 4, 2, 64, 512, 512], true);
    let smol = config([576, 30, 9, 3, 64, 1536, 49152], true);
    let cases: Vec<(&str, &LlamaConfig, DType, Option<ForcedKernel>)> = vec![
        ("tiny", &tiny, DType::F32, None),
        ("tiny", &tiny, DType::F32, Some(ForcedKernel::Split(3))),
        ("tiny", &tiny, DType::BF16, None),
        ("tiny", &tiny, DType::BF16, Some(ForcedKernel::Simple)),
        ("tiny", &tiny, DType::F16, Some(ForcedKernel::Tiled)),
        ("smollm2-135m-shape", &smol, DType::F32, None),
        ("smollm2-135m-shape", &smol, DType::BF16, None),
    ];
    for (name, cfg, dtype, kernel) in cases {
        match check_model(ordinal, name, cfg, dtype, kernel) {
            Ok(o) => tally.record(&o),
            Err(e) => tally.error(&format!("model {name} {dtype}"), e),
        }
    }

    println!("\n== benchmarks (random bf16 weights made on the GPU, greedy rows picked on the GPU)");
    let bw = match copy_bandwidth(ordinal) {
        Ok(bw) => {
            println!("device-to-device copy: {:.0} GB/s (bytes read + written)", bw / 1e9);
            bw
        }
        Err(e) => {
            tally.error("copy bandwidth", e);
            f64::NAN
        }
    };
    let mut shapes = vec![
        ("SmolLM2-135M", smol.clone()),
        ("Llama-3.2-1B", config([2048, 16, 32, 8, 64, 8192, 128256], true)),
    ];
    if !quick {
        shapes.push(("Llama-3-8B", config([4096, 32, 32, 8, 128, 14336, 128256], false)));
    }
    println!(
        "{:<14} {:>7} {:>5} {:>7} {:>10} {:>12} {:>8}",
        "model", "kind", "batch", "tokens", "step ms", "tok/s", "HBM %"
    );
    for (name, cfg) in &shapes {
        match decode_bench(ordinal, name, cfg, &[1, 8, 32, 64, 128, 256], 512, 2048, bw) {
            Ok(rows) => {
                for r in &rows {
                    println!(
                        "{:<14} {:>7} {:>5} {:>7} {:>10.3} {:>12.0} {:>7.1}%",
                        r.model,
                        r.kind,
                        r.batch,
                        r.context,
                        r.step_ms,
                        r.tokens_per_s,
                        100.0 * r.hbm_fraction
                    );
                }
                let at = |b: usize| rows.iter().find(|r| r.kind == "decode" && r.batch == b);
                if *name != "SmolLM2-135M"
                    && let Some(r) = at(1)
                {
                    let met = if r.hbm_fraction >= 0.6 { "met" } else { "NOT met" };
                    let share = 100.0 * r.hbm_fraction;
                    println!("goal {name} batch-1 decode >= 60% of copy bandwidth: {met} ({share:.1}%)");
                }
                if *name == "Llama-3-8B"
                    && let Some(r) = at(64)
                {
                    let met = if r.tokens_per_s >= 3000.0 { "met" } else { "NOT met" };
                    println!("goal Llama-3-8B batch-64 decode >= 3,000 tok/s: {met} ({:.0})", r.tokens_per_s);
                }
            }
            Err(e) => tally.error(&format!("benchmark {name}"), e),
        }
    }
    println!("\nfinished in {:.0} s", started.elapsed().as_secs_f64());
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
