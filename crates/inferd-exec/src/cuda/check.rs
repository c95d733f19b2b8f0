//! Correctness checks of the CUDA backend against the host, run by the GPU
//! check (`inferd-gpu-check`): the cache write and each attention kernel on
//! a mixed batch written through shuffled block tables, compared with an
//! f64 softmax; whole models through the CPU and CUDA executors.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::{DType as CandleDType, Device, Tensor};
use inferd_contract::{DType, ExecError, ModelExecutor, ModelInput, ModelOutput, StartedSeq};
use inferd_core::{RequestId, SamplingParams};
use inferd_kernels::{
    AttentionPlan, AttnShape, RowSample, StepMeta, attend_segment, kept_distribution, merge_partials,
    tiled_rows,
};
use inferd_models::testing::random_weights;
use inferd_models::{Llama, LlamaConfig, WeightFormat};

use super::attention::{CudaAttention, LayerCache};
use super::device::{Kernels, driver_err, sample_rows};
use super::{CudaExecutor, CudaExecutorConfig, ForcedKernel};
use crate::{CpuExecutor, CpuExecutorConfig, candle_dtype};

/// One comparison: its largest error and what it may be.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOutcome {
    pub name: String,
    pub error: f32,
    pub tolerance: f32,
    pub detail: String,
}

impl CheckOutcome {
    pub fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }
}

fn cerr(e: candle_core::Error) -> ExecError {
    ExecError::Backend(e.to_string())
}

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// `values` rounded through `dtype`, as the GPU holds them.
fn rounded(values: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => values,
        DType::F16 => values.into_iter().map(|x| half::f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => values.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect(),
    }
}

/// Largest error allowed on attention outputs (averages of values in
/// [-1, 1]) per dtype: accumulation is f32, the output is rounded once.
fn attention_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
    }
}

fn shuffled_tables(contexts: &[usize], block_size: usize, spare: usize) -> (Vec<Vec<u32>>, usize) {
    let total: usize = contexts.iter().map(|c| c.div_ceil(block_size)).sum::<usize>() + spare;
    let mut ids: Vec<u32> = (0..total as u32).collect();
    let mut x = 12345u64;
    for i in (1..ids.len()).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ids.swap(i, (x >> 33) as usize % (i + 1));
    }
    let mut at = 0;
    let tables = contexts
        .iter()
        .map(|c| {
            let n = c.div_ceil(block_size);
            at += n;
            ids[at - n..at].to_vec()
        })
        .collect();
    (tables, total)
}

fn upload(
    data: &[f32],
    shape: (usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor, ExecError> {
    Tensor::from_slice(data, shape, device).and_then(|t| t.to_dtype(candle_dtype(dtype))).map_err(cerr)
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>, ExecError> {
    t.to_dtype(CandleDType::F32).and_then(|t| t.flatten_all()?.to_vec1()).map_err(cerr)
}

/// Reads one raw cache buffer back as f32.
fn cache_f32(buf: &CudaSlice<u8>, stream: &Arc<CudaStream>, dtype: DType) -> Result<Vec<f32>, ExecError> {
    let bytes = stream.clone_dtoh(buf).map_err(driver_err)?;
    Ok(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::F16 => {
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        DType::BF16 => {
            bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
    })
}

/// What every attention call of the kernel check shares.
struct AttnCtx<'a> {
    stream: &'a Arc<CudaStream>,
    kernels: &'a Kernels,
    cache: &'a [LayerCache],
    shape: AttnShape,
}

impl<'a> AttnCtx<'a> {
    fn attn(
        &self,
        layout: &'a StepMeta,
        meta: &'a Tensor,
        input: &ModelInput,
        plan: AttentionPlan,
        workspace: Option<Tensor>,
    ) -> CudaAttention<'a> {
        CudaAttention {
            stream: self.stream,
            kernels: self.kernels,
            cache: self.cache,
            shape: self.shape,
            plan,
            meta,
            layout,
            num_tokens: input.num_tokens() as u32,
            max_blocks: input.max_blocks_per_seq as u32,
            workspace,
        }
    }
}

/// The cache write and every attention kernel for one dtype, head dim and
/// block size, on a mixed batch: a prefill from 0, a chunked prefill at an
/// offset with its prefix in the cache, a long decode (1,500 positions), a
/// short decode, and a 16-token chunk after a 48-token prefix, all through
/// shuffled block tables.
pub fn check_attention_kernels(
    ordinal: usize,
    dtype: DType,
    head_dim: u32,
    block_size: u32,
) -> Result<Vec<CheckOutcome>, ExecError> {
    let device = Device::new_cuda(ordinal).map_err(cerr)?;
    let Device::Cuda(cuda) = &device else { unreachable!("made as CUDA") };
    let stream = cuda.cuda_stream();
    let kernels = Kernels::load(&stream, dtype, head_dim)?;
    let (heads, kv_heads) = if head_dim == 64 { (12u32, 4u32) } else { (32, 8) };
    let shape = AttnShape { num_heads: heads, num_kv_heads: kv_heads, head_dim, block_size };
    let (d, bs, row) = (head_dim as usize, block_size as usize, (kv_heads * head_dim) as usize);
    let seqs: [(usize, usize); 5] = [(37, 37), (300, 20), (1500, 1), (17, 1), (64, 16)];
    let contexts: Vec<usize> = seqs.iter().map(|s| s.0).collect();
    let (tables, num_blocks) = shuffled_tables(&contexts, bs, 7);
    let elem = dtype.size_in_bytes();
    let layer_bytes = num_blocks * bs * row * elem;
    let cache = [LayerCache {
        k: stream.alloc_zeros::<u8>(layer_bytes).map_err(driver_err)?,
        v: stream.alloc_zeros::<u8>(layer_bytes).map_err(driver_err)?,
    }];
    // Every position's K and V, written through the kernel in one step.
    let total: usize = contexts.iter().sum();
    let keys = rounded(noise(total * row, 1), dtype);
    let values = rounded(noise(total * row, 2), dtype);
    let mut write = ModelInput::new(0);
    for (s, &c) in contexts.iter().enumerate() {
        write.push_seq(RequestId(s as u64), &vec![0; c], 0, &tables[s], bs, false);
    }
    let ctx = AttnCtx { stream: &stream, kernels: &kernels, cache: &cache, shape };
    let write_layout = StepMeta::pack(&write, None);
    let write_meta =
        Tensor::from_slice(&write_layout.data, write_layout.data.len(), &device).map_err(cerr)?;
    let k_all = upload(&keys, (total, kv_heads as usize, d), dtype, &device)?;
    let v_all = upload(&values, (total, kv_heads as usize, d), dtype, &device)?;
    ctx.attn(&write_layout, &write_meta, &write, AttentionPlan::Simple, None).write_kv(0, &k_all, &v_all)?;
    let mut outcomes = Vec::new();
    let (k_back, v_back) = (cache_f32(&cache[0].k, &stream, dtype)?, cache_f32(&cache[0].v, &stream, dtype)?);
    let mut write_err = 0f32;
    for (t, &slot) in write.slot_mapping.iter().enumerate() {
        let (src, dst) = (t * row..(t + 1) * row, slot as usize * row..(slot as usize + 1) * row);
        for (a, b) in
            keys[src.clone()].iter().zip(&k_back[dst.clone()]).chain(values[src].iter().zip(&v_back[dst]))
        {
            write_err = write_err.max((a - b).abs());
        }
    }
    outcomes.push(CheckOutcome {
        name: format!("cache write {dtype} d{head_dim} bs{block_size}"),
        error: write_err,
        tolerance: 0.0,
        detail: format!("{total} positions through shuffled tables"),
    });

    // The query part of each sequence, and the f64-accurate answer.
    let mut step = ModelInput::new(0);
    for (s, &(c, q)) in seqs.iter().enumerate() {
        step.push_seq(RequestId(s as u64), &vec![0; q], c - q, &tables[s], bs, true);
    }
    let t = step.num_tokens();
    let queries = rounded(noise(t * (heads * head_dim) as usize, 3), dtype);
    let scale = 1.0 / (d as f32).sqrt();
    let seq_start: Vec<usize> =
        contexts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
    let mut want = vec![0f32; t * (heads * head_dim) as usize];
    let group = (heads / kv_heads) as usize;
    for s in 0..seqs.len() {
        for i in step.query_range(s) {
            let pos = step.positions[i] as usize;
            for h in 0..heads as usize {
                let kvh = h / group;
                let at = |buf: &[f32], p: usize| buf[(seq_start[s] + p) * row + kvh * d..][..d].to_vec();
                let ks: Vec<Vec<f32>> = (0..=pos).map(|p| at(&keys, p)).collect();
                let vs: Vec<Vec<f32>> = (0..=pos).map(|p| at(&values, p)).collect();
                let q: Vec<f32> =
                    queries[(i * heads as usize + h) * d..][..d].iter().map(|x| x * scale).collect();
                let out = merge_partials(&[attend_segment(&q, &ks, &vs, 0..pos + 1)]);
                want[(i * heads as usize + h) * d..][..d].copy_from_slice(&out);
            }
        }
    }
    let q_dev = upload(&queries, (t, heads as usize, d), dtype, &device)?;
    let mut kernels_to_check = vec![ForcedKernel::Simple, ForcedKernel::Split(4), ForcedKernel::Split(1)];
    if dtype != DType::F32 {
        kernels_to_check.push(ForcedKernel::Tiled);
    }
    for kernel in kernels_to_check {
        let plan = kernel.plan(head_dim, step.max_context_len);
        let tiles =
            matches!(plan, AttentionPlan::Tiled { .. }).then(|| (shape.group(), tiled_rows(head_dim)));
        let layout = StepMeta::pack(&step, tiles);
        let meta = Tensor::from_slice(&layout.data, layout.data.len(), &device).map_err(cerr)?;
        let workspace = match plan.workspace_len(&shape, t as u32) {
            0 => None,
            n => Some(Tensor::zeros(n, CandleDType::F32, &device).map_err(cerr)?),
        };
        let out = ctx.attn(&layout, &meta, &step, plan, workspace).attention(0, &q_dev)?;
        let got = host_f32(&out)?;
        let error = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        outcomes.push(CheckOutcome {
            name: format!("attention {kernel:?} {dtype} d{head_dim} bs{block_size}"),
            error: if got.iter().all(|x| x.is_finite()) { error } else { f32::NAN },
            tolerance: attention_tolerance(dtype),
            detail: format!("{t} query tokens x {heads} heads, contexts {contexts:?}"),
        });
    }
    Ok(outcomes)
}

/// A fixed schedule for the model check: a 40-token prompt prefilled in
/// chunks of 16, 16 and 8 beside a 7-token prompt, then decode steps with
/// given tokens; every row's logits wanted.
fn model_schedule(block_size: usize, vocab: u32) -> Vec<ModelInput> {
    let a: Vec<u32> = (0..48).map(|i| (i * 37 + 5) % vocab).collect();
    let b: Vec<u32> = (0..15).map(|i| (i * 53 + 11) % vocab).collect();
    let (tables, _) = shuffled_tables(&[48, 15], block_size, 5);
    let params = Arc::new(SamplingParams { temperature: 1.0, ..Default::default() });
    let start = |id: u64, len: usize| StartedSeq {
        id: RequestId(id),
        prompt_len: len as u32,
        params: params.clone(),
    };
    let mut steps = Vec::new();
    let mut first = ModelInput::new(0);
    first.push_seq(RequestId(1), &a[..16], 0, &tables[0], block_size, true);
    first.push_seq(RequestId(2), &b[..7], 0, &tables[1], block_size, true);
    first.started = vec![start(1, 40), start(2, 7)];
    steps.push(first);
    for (from, to) in [(16, 32), (32, 40)] {
        let mut s = ModelInput::new(0);
        s.push_seq(RequestId(1), &a[from..to], from, &tables[0], block_size, true);
        steps.push(s);
    }
    for i in 0..8 {
        let mut s = ModelInput::new(0);
        s.push_seq(RequestId(1), &a[40 + i..41 + i], 40 + i, &tables[0], block_size, true);
        s.push_seq(RequestId(2), &b[7 + i..8 + i], 7 + i, &tables[1], block_size, true);
        steps.push(s);
    }
    for s in &mut steps {
        s.logits_rows = (0..s.num_tokens() as u32).collect();
    }
    steps
}

/// A whole model with random weights through the CPU executor (f32) and the
/// CUDA executor (`dtype`, with `kernel` forced if given) over chunked
/// prefill and decode: the largest logit difference relative to the
/// largest logit, and in f32 the greedy tokens, which must be identical.
pub fn check_model(
    ordinal: usize,
    name: &str,
    cfg: &LlamaConfig,
    dtype: DType,
    kernel: Option<ForcedKernel>,
) -> Result<CheckOutcome, ExecError> {
    let bs = 16;
    let max_pos = 256;
    let cpu_model = Llama::new(
        cfg.clone(),
        random_weights(cfg, 11).map_err(cerr)?,
        WeightFormat::Dense,
        CandleDType::F32,
        max_pos,
        &Device::Cpu,
    )
    .map_err(cerr)?;
    let device = Device::new_cuda(ordinal).map_err(cerr)?;
    let gpu_weights = random_weights(cfg, 11).and_then(|w| w.to_device(&device)).map_err(cerr)?;
    let gpu_model =
        Llama::new(cfg.clone(), gpu_weights, WeightFormat::Dense, candle_dtype(dtype), max_pos, &device)
            .map_err(cerr)?;
    let mut cpu = CpuExecutor::new(
        cpu_model,
        CpuExecutorConfig {
            block_size: bs,
            kv_cache_memory: 64 << 20,
            kv_dtype: DType::F32,
            max_model_len: max_pos,
        },
    )?;
    let mut gpu = CudaExecutor::new(
        gpu_model,
        CudaExecutorConfig {
            block_size: bs,
            gpu_memory_utilization: 0.9,
            max_model_len: max_pos,
            max_blocks: Some(64),
        },
    )?;
    gpu.force_kernel(kernel);
    let (mut worst, mut scale, mut rows, mut same_top) = (0f32, 0f32, 0usize, 0usize);
    for input in model_schedule(bs, cfg.vocab_size as u32) {
        let want = match cpu.execute(&input)? {
            ModelOutput::Logits(l) => l,
            ModelOutput::Sampled(_) => return Err(ExecError::Backend("the CPU returned tokens".into())),
        };
        let got = match gpu.execute(&input)? {
            ModelOutput::Logits(l) => l,
            ModelOutput::Sampled(_) => {
                return Err(ExecError::Backend("sampled rows must return logits".into()));
            }
        };
        for r in 0..want.num_rows() {
            let (w, g) = (want.row(r), got.row(r));
            scale = w.iter().fold(scale, |m, x| m.max(x.abs()));
            worst = w.iter().zip(g).fold(worst, |m, (a, b)| m.max((a - b).abs()));
            rows += 1;
            same_top += usize::from(crate::sampler::argmax(w) == crate::sampler::argmax(g));
        }
    }
    let relative = if worst.is_finite() { worst / scale.max(1e-6) } else { f32::NAN };
    let (tolerance, tokens_ok) = match dtype {
        DType::F32 => (1e-3, same_top == rows),
        DType::F16 => (2e-2, true),
        DType::BF16 => (6e-2, true),
    };
    Ok(CheckOutcome {
        name: format!(
            "model {name} {dtype} kernel {}",
            kernel.map_or("planned".into(), |k| format!("{k:?}"))
        ),
        error: if tokens_ok { relative } else { f32::INFINITY },
        tolerance,
        detail: format!(
            "largest logit error {worst:.2e} of {scale:.2}; same greedy token in {same_top} of {rows} rows"
        ),
    })
}

/// The sampling kernel against the distribution it is specified to draw
/// from (`inferd_kernels::kept_distribution`, which equals the host
/// sampler's): greedy with a tie, top-k, top-k with top-p, and the whole
/// softmax, 8,192 draws each over a 32,000-token vocabulary. Every kept
/// token's frequency must lie within 5 sigma of its probability (the error
/// reported is the largest z), and no draw may fall outside the kept set.
pub fn check_sampling(ordinal: usize) -> Result<Vec<CheckOutcome>, ExecError> {
    let device = Device::new_cuda(ordinal).map_err(cerr)?;
    let Device::Cuda(cuda) = &device else { unreachable!("made as CUDA") };
    let stream = cuda.cuda_stream();
    let kernels = Kernels::load(&stream, DType::F32, 64)?;
    let vocab = 32_000usize;
    let mut logits: Vec<f32> = noise(vocab, 7).iter().map(|x| x * 1.5 - 1.5).collect();
    for (i, v) in [(7, 3.0), (8, 3.0), (100, 2.5), (31_999, 2.0), (500, 1.0)] {
        logits[i] = v;
    }
    let cases: [(&str, f32, f32, u32); 4] = [
        ("greedy (tie 7/8)", 1.0, 1.0, 1),
        ("top-k 50, T 0.8", 0.8, 1.0, 50),
        ("top-k 200, top-p 0.6", 1.0, 0.6, 200),
        ("whole softmax, T 1.3", 1.3, 1.0, 0),
    ];
    let (batch, launches) = (512usize, 16u64);
    let mut outcomes = Vec::new();
    for (name, temperature, top_p, top_k) in cases {
        let row = |counter: u64, seed: u64| RowSample { temperature, top_p, top_k, pad: 0, seed, counter };
        let want = kept_distribution(&logits, &row(0, 0));
        let table = Tensor::from_slice(&logits, (1, vocab), &device)
            .and_then(|t| t.repeat((batch, 1)))
            .map_err(cerr)?;
        let mut counts = std::collections::HashMap::<u32, u64>::new();
        for seed in 0..launches {
            let rows: Vec<RowSample> = (0..batch as u64).map(|c| row(c, seed * 7919 + 13)).collect();
            for id in sample_rows(&device, &stream, &kernels, &table, &rows)? {
                *counts.entry(id).or_default() += 1;
            }
        }
        let n = (batch as u64 * launches) as f64;
        let outside: u64 =
            counts.iter().filter(|(id, _)| !want.iter().any(|w| w.0 == **id)).map(|(_, c)| c).sum();
        let mut worst_z = 0f64;
        for &(id, p) in want.iter().take(64) {
            let freq = counts.get(&id).copied().unwrap_or(0) as f64 / n;
            let sigma = (p * (1.0 - p) / n).sqrt().max(1e-4);
            worst_z = worst_z.max((freq - p).abs() / sigma);
        }
        outcomes.push(CheckOutcome {
            name: format!("sampling {name}"),
            error: if outside > 0 { f32::INFINITY } else { worst_z as f32 },
            tolerance: 5.0,
            detail: format!("{} kept tokens, {} draws, {outside} outside the kept set", want.len(), n),
        });
    }
    Ok(outcomes)
}
