//! One forward step of the real SmolLM2 on the CPU executor: decode at batch
//! 1, 8 and 32 with 256 tokens of context each, and a 512-token prefill, for
//! each CPU compute format. Throughput is reported in tokens per second.
//! Needs models/ (make model); threads follow INFERD_CPU_THREADS (and
//! CANDLE_NUM_THREADS for candle's own ops), defaulting to the cores this
//! process may use. `INFERD_CPU_MATMUL=candle` runs candle's matmul kernels
//! instead of inferd's, to compare.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inferd_benches::{decode_input, prefill_input};
use inferd_contract::{DType, ModelExecutor};
use inferd_exec::{CpuExecutor, CpuExecutorConfig};
use inferd_models::testing::smollm2_path;
use inferd_models::{LoadOptions, WeightFormat, load_weights};

const BLOCK_SIZE: usize = 16;

fn executor(format: WeightFormat) -> CpuExecutor {
    let opts = LoadOptions { format, max_positions: Some(1024), ..Default::default() };
    let model = load_weights(&smollm2_path(), &opts).expect("model loads");
    let cfg = CpuExecutorConfig {
        block_size: BLOCK_SIZE,
        kv_cache_memory: 1 << 30,
        kv_dtype: DType::F32,
        max_model_len: 1024,
    };
    CpuExecutor::new(model, cfg).expect("cache fits")
}

fn formats() -> Vec<WeightFormat> {
    match std::env::var("INFERD_BENCH_FORMATS") {
        Ok(list) => list.split(',').map(|f| f.parse().expect("native, q8_0 or dense")).collect(),
        Err(_) => vec![WeightFormat::Native, WeightFormat::Q8_0, WeightFormat::Dense],
    }
}

fn decode_step(c: &mut Criterion) {
    for format in formats() {
        let mut exec = executor(format);
        let mut group = c.benchmark_group(format!("decode_step/{format:?}"));
        group.sample_size(10);
        for batch in [1usize, 8, 32] {
            let input = decode_input(batch, 256, BLOCK_SIZE);
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_with_input(BenchmarkId::new("batch", batch), &input, |b, input| {
                b.iter(|| exec.execute(input).expect("step runs"))
            });
        }
        let input = prefill_input(512, BLOCK_SIZE);
        group.throughput(Throughput::Elements(512));
        group.bench_with_input(BenchmarkId::new("prefill", 512), &input, |b, input| {
            b.iter(|| exec.execute(input).expect("step runs"))
        });
        group.finish();
    }
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
