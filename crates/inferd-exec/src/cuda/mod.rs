//! The CUDA executor: a llama-family model on an NVIDIA GPU. candle runs the
//! dense layers (cuBLAS, or candle's quantized CUDA kernels for GGUF
//! weights); inferd's own kernels (kernels/) write each step's K/V into the
//! paged cache and run paged attention over the mixed batch. The step's
//! metadata goes up in one copy per step; logits are computed only for the
//! rows that are sampled, and steps whose rows the GPU can sample exactly as
//! the host would (greedy, temperature, top-k, top-p) draw their tokens there
//! and copy ids instead of logits.

mod attention;
mod bench;
mod check;
mod device;

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::{Device, Tensor};
use inferd_contract::{
    Capabilities, DType, DeviceSpec, ExecError, Logits, ModelExecutor, ModelInput, ModelOutput, SampledToken,
};
use inferd_kernels::{AttentionPlan, AttnShape, RowSample, StepMeta, plan_attention, tiled_rows};
use inferd_models::{BatchTokens, Llama};

use attention::{CudaAttention, LayerCache};
pub use bench::{BenchRow, copy_bandwidth, decode_bench};
pub use check::{CheckOutcome, check_attention_kernels, check_model, check_sampling};
pub use device::GpuFacts;
use device::{Kernels, driver_err, sample_rows};

use crate::cpu::block_bytes;
use crate::{LiveSeqs, contract_dtype, device_kv_budget, device_row, kv_blocks_in};

/// Compute dtypes the CUDA executor runs.
pub const CUDA_DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// How the CUDA executor sizes its cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CudaExecutorConfig {
    pub block_size: usize,
    /// Fraction of GPU memory to fill, weights included.
    pub gpu_memory_utilization: f64,
    /// Longest sequence served; at most the model's RoPE table.
    pub max_model_len: usize,
    /// Cap on the KV blocks (the GPU check sizes small caches); `None`: as
    /// many as the memory budget holds.
    pub max_blocks: Option<usize>,
}

/// Runs a model on one GPU over a paged KV cache.
#[derive(Debug)]
pub struct CudaExecutor {
    model: Llama,
    device: Device,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    cache: Vec<LayerCache>,
    caps: Capabilities,
    shape: AttnShape,
    facts: GpuFacts,
    live: LiveSeqs,
    forced: Option<ForcedKernel>,
}

/// An attention kernel the GPU check forces for every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedKernel {
    Simple,
    /// Split-K into this many segments per context.
    Split(u32),
    Tiled,
}

impl ForcedKernel {
    /// The plan for a step whose longest context is `max_context_len`.
    pub fn plan(self, head_dim: u32, max_context_len: u32) -> AttentionPlan {
        match self {
            ForcedKernel::Simple => AttentionPlan::Simple,
            ForcedKernel::Split(n) => {
                AttentionPlan::Split { segments: n, seg_len: max_context_len.div_ceil(n).max(1) }
            }
            ForcedKernel::Tiled => AttentionPlan::Tiled { warps: inferd_kernels::tiled_warps(head_dim) },
        }
    }
}

impl CudaExecutor {
    /// Takes a model loaded on a CUDA device, loads the kernels and fills
    /// what the weights left of `gpu_memory_utilization` with KV blocks.
    pub fn new(model: Llama, cfg: CudaExecutorConfig) -> Result<Self, ExecError> {
        let device = model.device().clone();
        let Device::Cuda(cuda) = &device else {
            return Err(ExecError::Config("the CUDA executor needs a model loaded on a CUDA device".into()));
        };
        let stream = cuda.cuda_stream();
        let facts = GpuFacts::read(&stream)?;
        let dtype = contract_dtype(model.dtype())?;
        let mc = model.config();
        let shape = AttnShape {
            num_heads: mc.num_heads as u32,
            num_kv_heads: mc.num_kv_heads as u32,
            head_dim: mc.head_dim as u32,
            block_size: cfg.block_size as u32,
        };
        shape.validate().map_err(ExecError::Config)?;
        let kernels = Kernels::load(&stream, dtype, shape.head_dim)?;
        let per_block = block_bytes(mc.num_layers, cfg.block_size, mc.num_kv_heads, mc.head_dim, dtype);
        let (free, total) = stream.context().mem_get_info().map_err(driver_err)?;
        let budget = device_kv_budget(total, total - free, cfg.gpu_memory_utilization)?;
        let mut num_blocks = kv_blocks_in(budget, per_block)?;
        // Slots are u32 in the step metadata.
        num_blocks = num_blocks.min(u32::MAX as usize / cfg.block_size);
        if let Some(cap) = cfg.max_blocks {
            num_blocks = num_blocks.min(cap);
        }
        let layer_bytes = per_block / mc.num_layers / 2 * num_blocks;
        let cache = (0..mc.num_layers)
            .map(|_| {
                Ok(LayerCache {
                    k: stream.alloc_zeros::<u8>(layer_bytes).map_err(driver_err)?,
                    v: stream.alloc_zeros::<u8>(layer_bytes).map_err(driver_err)?,
                })
            })
            .collect::<Result<Vec<_>, ExecError>>()?;
        let caps = Capabilities {
            device: DeviceSpec::Cuda(cuda_ordinal(&stream)),
            block_size: cfg.block_size,
            num_blocks,
            max_model_len: cfg.max_model_len.min(model.max_positions()),
            vocab_size: mc.vocab_size,
            compute_dtype: dtype,
            supported_dtypes: CUDA_DTYPES.to_vec(),
            kv_dtype: dtype,
            shape_buckets: None,
            device_sampling: None,
        };
        tracing::info!(
            gpu = %facts.name,
            sm = facts.sm_count,
            total_gib = facts.total_memory as f64 / (1u64 << 30) as f64,
            free_after_weights_gib = free as f64 / (1u64 << 30) as f64,
            kv_blocks = num_blocks,
            "CUDA executor ready"
        );
        Ok(CudaExecutor {
            model,
            device,
            stream,
            kernels,
            cache,
            caps,
            shape,
            facts,
            live: LiveSeqs::default(),
            forced: None,
        })
    }

    pub fn facts(&self) -> &GpuFacts {
        &self.facts
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// Runs every step with this attention kernel (the GPU check), or with
    /// the planned one again (`None`).
    pub fn force_kernel(&mut self, kernel: Option<ForcedKernel>) {
        self.forced = kernel;
    }

    /// Blocks until the GPU has finished everything queued (benchmarks).
    pub fn synchronize(&self) -> Result<(), ExecError> {
        self.stream.synchronize().map_err(driver_err)
    }

    /// Draws each row's token from `logits` (`(rows, vocab)` f32) on the
    /// GPU (kernels/cuda/sample.cuh) and copies the ids back.
    pub fn sample_on_device(&self, logits: &Tensor, rows: &[RowSample]) -> Result<Vec<u32>, ExecError> {
        sample_rows(&self.device, &self.stream, &self.kernels, logits, rows)
    }

    fn forward(&mut self, input: &ModelInput) -> Result<Tensor, ExecError> {
        let cerr = |e: candle_core::Error| ExecError::Backend(e.to_string());
        let s = self.shape;
        let plan = match self.forced {
            Some(k) => k.plan(s.head_dim, input.max_context_len),
            None => plan_attention(
                self.caps.compute_dtype,
                &s,
                input.num_tokens() as u32,
                input.max_query_len,
                input.max_context_len,
                self.facts.sm_count,
            ),
        };
        let tiles = matches!(plan, AttentionPlan::Tiled { .. }).then(|| (s.group(), tiled_rows(s.head_dim)));
        let layout = StepMeta::pack(input, tiles);
        // The step's one upload.
        let meta = Tensor::from_slice(&layout.data, layout.data.len(), &self.device).map_err(cerr)?;
        let view = |r: &std::ops::Range<usize>| meta.narrow(0, r.start, r.len()).map_err(cerr);
        let batch = BatchTokens {
            token_ids: view(&layout.token_ids)?,
            positions: view(&layout.positions)?,
            logits_rows: view(&layout.logits_rows)?,
        };
        let num_tokens = input.num_tokens() as u32;
        let workspace = match plan.workspace_len(&s, num_tokens) {
            0 => None,
            n => Some(Tensor::zeros(n, candle_core::DType::F32, &self.device).map_err(cerr)?),
        };
        let mut attn = CudaAttention {
            stream: &self.stream,
            kernels: &self.kernels,
            cache: &self.cache,
            shape: s,
            plan,
            meta: &meta,
            layout: &layout,
            num_tokens,
            max_blocks: input.max_blocks_per_seq as u32,
            workspace,
        };
        self.model.forward(&batch, &mut attn).map_err(cerr)
    }
}

/// What GPU `ordinal` is.
pub fn gpu_facts(ordinal: usize) -> Result<GpuFacts, ExecError> {
    let device = Device::new_cuda(ordinal).map_err(|e| ExecError::Unavailable(e.to_string()))?;
    let Device::Cuda(cuda) = &device else { unreachable!("made as CUDA") };
    GpuFacts::read(&cuda.cuda_stream())
}

fn cuda_ordinal(stream: &CudaStream) -> usize {
    stream.context().ordinal()
}

impl ModelExecutor for CudaExecutor {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError> {
        input.validate(self.caps.block_size, self.caps.num_blocks).map_err(ExecError::Input)?;
        self.live.apply(input).map_err(ExecError::Input)?;
        if input.logits_rows.is_empty() && input.num_tokens() == 0 {
            return Ok(ModelOutput::Logits(Logits { vocab_size: self.caps.vocab_size, data: Vec::new() }));
        }
        let logits = self.forward(input)?;
        let cerr = |e: candle_core::Error| ExecError::Backend(e.to_string());
        let params = self.live.row_params(input).map_err(ExecError::Input)?;
        // Rows the GPU samples exactly as the host would: copy ids, not logits.
        let seqs = input.row_seqs();
        let rows: Option<Vec<RowSample>> = params
            .iter()
            .zip(&seqs)
            .map(|(p, &s)| device_row(p, u64::from(input.context_lens[s]), rand::random))
            .collect();
        if let Some(rows) = rows.filter(|r| !r.is_empty()) {
            let ids = self.sample_on_device(&logits, &rows)?;
            let tokens = ids.into_iter().map(|token| SampledToken { token, logprobs: None }).collect();
            return Ok(ModelOutput::Sampled(tokens));
        }
        let data = logits.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(cerr)?;
        Ok(ModelOutput::Logits(Logits::new(data, self.caps.vocab_size)?))
    }
}
