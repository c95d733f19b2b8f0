//! Decode and prefill benchmarks of the CUDA executor for the GPU check:
//! model shapes with random bf16 weights made on the GPU, step times, and
//! the share of HBM bandwidth they reach next to a measured copy.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType as CandleDType, Device};
use inferd_contract::{ExecError, ModelExecutor, ModelInput, StartedSeq};
use inferd_core::{RequestId, SamplingParams};
use inferd_models::testing::random_weights_on;
use inferd_models::{Llama, LlamaConfig, WeightFormat};

use super::device::driver_err;
use super::{CudaExecutor, CudaExecutorConfig};

/// One measured configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub model: String,
    /// "decode" or "prefill".
    pub kind: &'static str,
    pub batch: usize,
    /// Tokens of context per sequence (decode) or the prompt length (prefill).
    pub context: usize,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    /// Weights plus KV read per step.
    pub bytes_per_step: f64,
    /// (bytes per step / step time) over the measured copy bandwidth.
    pub hbm_fraction: f64,
}

fn cerr(e: candle_core::Error) -> ExecError {
    ExecError::Backend(e.to_string())
}

/// Device-to-device copy bandwidth in bytes per second, counting the bytes
/// read and the bytes written, over a 1 GiB buffer.
pub fn copy_bandwidth(ordinal: usize) -> Result<f64, ExecError> {
    let device = Device::new_cuda(ordinal).map_err(cerr)?;
    let Device::Cuda(cuda) = &device else { unreachable!("made as CUDA") };
    let stream = cuda.cuda_stream();
    let n = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(n).map_err(driver_err)?;
    let mut dst = stream.alloc_zeros::<u8>(n).map_err(driver_err)?;
    stream.memcpy_dtod(&src, &mut dst).map_err(driver_err)?;
    stream.synchronize().map_err(driver_err)?;
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        stream.memcpy_dtod(&src, &mut dst).map_err(driver_err)?;
    }
    stream.synchronize().map_err(driver_err)?;
    Ok(2.0 * (n * reps) as f64 / t.elapsed().as_secs_f64())
}

/// Seconds per step of `steady` after `first` (which carries the lifecycle)
/// and two warm-up steps.
fn time_steps(exec: &mut CudaExecutor, first: &ModelInput, steady: &ModelInput) -> Result<f64, ExecError> {
    exec.execute(first)?;
    for _ in 0..2 {
        exec.execute(steady)?;
    }
    exec.synchronize()?;
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        exec.execute(steady)?;
    }
    exec.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

/// Bytes of a model's weights in bf16.
fn weight_bytes(cfg: &LlamaConfig) -> f64 {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let per_layer =
        h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h + 3 * h * i + 2 * h;
    let head = if cfg.tie_word_embeddings { 0 } else { cfg.vocab_size * h };
    2.0 * (cfg.num_layers * per_layer + cfg.vocab_size * h + head + h) as f64
}

/// KV bytes of one token, all layers, K and V, in bf16.
fn kv_bytes_per_token(cfg: &LlamaConfig) -> f64 {
    (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2) as f64
}

/// Decode steps at each of `batches` with `context` tokens per sequence,
/// then one prefill of `prefill` tokens, for `cfg` with random bf16
/// weights; greedy rows, so tokens are picked on the GPU.
pub fn decode_bench(
    ordinal: usize,
    name: &str,
    cfg: &LlamaConfig,
    batches: &[usize],
    context: usize,
    prefill: usize,
    copy_bw: f64,
) -> Result<Vec<BenchRow>, ExecError> {
    const BS: usize = 16;
    let device = Device::new_cuda(ordinal).map_err(cerr)?;
    let weights = random_weights_on(cfg, &device, CandleDType::BF16).map_err(cerr)?;
    let max_pos = context.max(prefill) + 16;
    let model = Llama::new(cfg.clone(), weights, WeightFormat::Dense, CandleDType::BF16, max_pos, &device)
        .map_err(cerr)?;
    let per_seq = (context + 1).div_ceil(BS);
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let blocks = (max_batch * per_seq).max(prefill.div_ceil(BS)) + 1;
    let mut exec = CudaExecutor::new(
        model,
        CudaExecutorConfig {
            block_size: BS,
            gpu_memory_utilization: 0.9,
            max_model_len: max_pos,
            max_blocks: Some(blocks),
        },
    )?;
    if exec.capabilities().num_blocks < blocks {
        return Err(ExecError::Config(format!("{name}: {blocks} KV blocks do not fit next to the weights")));
    }
    let params = Arc::new(SamplingParams { temperature: 0.0, ..Default::default() });
    let mut rows = Vec::new();
    let mut next_id = 0u64;
    let mut finished = Vec::new();
    for &batch in batches {
        let mut steady = ModelInput::new(per_seq);
        let mut ids = Vec::with_capacity(batch);
        for s in 0..batch {
            let id = RequestId(next_id);
            next_id += 1;
            ids.push(id);
            let first_block = (s * per_seq) as u32;
            let table: Vec<u32> = (first_block..first_block + per_seq as u32).collect();
            steady.push_seq(id, &[100 + s as u32 % 1000], context, &table, BS, true);
        }
        let mut first = steady.clone();
        first.finished = std::mem::take(&mut finished);
        first.started = ids
            .iter()
            .map(|&id| StartedSeq { id, prompt_len: context as u32, params: params.clone() })
            .collect();
        let secs = time_steps(&mut exec, &first, &steady)?;
        finished = ids;
        let bytes = weight_bytes(cfg) + batch as f64 * (context + 1) as f64 * kv_bytes_per_token(cfg);
        rows.push(BenchRow {
            model: name.into(),
            kind: "decode",
            batch,
            context,
            step_ms: secs * 1e3,
            tokens_per_s: batch as f64 / secs,
            bytes_per_step: bytes,
            hbm_fraction: bytes / secs / copy_bw,
        });
    }
    if prefill > 0 {
        let id = RequestId(next_id);
        let table: Vec<u32> = (0..prefill.div_ceil(BS) as u32).collect();
        let tokens: Vec<u32> = (0..prefill as u32).map(|i| 100 + i % 1000).collect();
        let mut step = ModelInput::new(table.len());
        step.push_seq(id, &tokens, 0, &table, BS, true);
        let mut first = step.clone();
        first.finished = finished;
        first.started = vec![StartedSeq { id, prompt_len: prefill as u32, params }];
        // Re-running the same prefill overwrites the same slots: a fair
        // measure of one prompt's compute.
        let secs = time_steps(&mut exec, &first, &step)?;
        rows.push(BenchRow {
            model: name.into(),
            kind: "prefill",
            batch: 1,
            context: prefill,
            step_ms: secs * 1e3,
            tokens_per_s: prefill as f64 / secs,
            bytes_per_step: weight_bytes(cfg),
            hbm_fraction: weight_bytes(cfg) / secs / copy_bw,
        });
    }
    Ok(rows)
}
