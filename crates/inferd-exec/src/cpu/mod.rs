//! The CPU executor: a llama-family model whose attention reads and writes a
//! paged KV cache held in plain vectors.

mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_x86;
mod kv_cache;

use candle_core::{DType as CandleDType, Device, Tensor};
use inferd_contract::{
    Capabilities, DType, DeviceSpec, ExecError, Logits, ModelExecutor, ModelInput, ModelOutput,
};
use inferd_models::{AttentionBackend, BatchTokens, Llama};

pub use attention::MAX_BLOCK_SIZE;
use attention::{AttnShape, paged_attention};
use kv_cache::KvCache;
pub use kv_cache::block_bytes;

use crate::{backend_err, contract_dtype, kv_blocks_in};

/// Compute dtypes the CPU runs (f32 is by far the fastest there).
pub const CPU_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// How the CPU executor sizes its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuExecutorConfig {
    pub block_size: usize,
    /// Bytes for the KV cache; the number of blocks follows from it.
    pub kv_cache_memory: usize,
    pub kv_dtype: DType,
    /// Longest sequence served; at most the model's RoPE table.
    pub max_model_len: usize,
}

/// Runs a model on the CPU over a paged KV cache.
#[derive(Debug)]
pub struct CpuExecutor {
    model: Llama,
    cache: KvCache,
    caps: Capabilities,
}

impl CpuExecutor {
    pub fn new(model: Llama, cfg: CpuExecutorConfig) -> Result<Self, ExecError> {
        let mc = model.config();
        if cfg.block_size == 0 || cfg.block_size > MAX_BLOCK_SIZE {
            return Err(ExecError::Config(format!(
                "block size must be in [1, {MAX_BLOCK_SIZE}], got {}",
                cfg.block_size
            )));
        }
        if !model.device().is_cpu() {
            return Err(ExecError::Config("the CPU executor needs a model loaded on the CPU".into()));
        }
        let compute_dtype = contract_dtype(model.dtype())?;
        let per_block =
            block_bytes(mc.num_layers, cfg.block_size, mc.num_kv_heads, mc.head_dim, cfg.kv_dtype);
        let num_blocks = kv_blocks_in(cfg.kv_cache_memory, per_block)?;
        let elems = num_blocks * cfg.block_size * mc.num_kv_heads * mc.head_dim;
        let caps = Capabilities {
            device: DeviceSpec::Cpu,
            block_size: cfg.block_size,
            num_blocks,
            max_model_len: cfg.max_model_len.min(model.max_positions()),
            vocab_size: mc.vocab_size,
            compute_dtype,
            supported_dtypes: CPU_DTYPES.to_vec(),
            kv_dtype: cfg.kv_dtype,
            shape_buckets: None,
            device_sampling: None,
        };
        Ok(CpuExecutor { cache: KvCache::new(cfg.kv_dtype, mc.num_layers, elems), model, caps })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    fn forward(&mut self, input: &ModelInput) -> candle_core::Result<Tensor> {
        let mc = self.model.config();
        let t = input.num_tokens();
        let mut token_seq = vec![0u32; t];
        for s in 0..input.num_seqs() {
            token_seq[input.query_range(s)].fill(s as u32);
        }
        let dev = Device::Cpu;
        let batch = BatchTokens {
            token_ids: Tensor::from_slice(&input.token_ids, t, &dev)?,
            positions: Tensor::from_slice(&input.positions, t, &dev)?,
            logits_rows: Tensor::from_slice(&input.logits_rows, input.logits_rows.len(), &dev)?,
        };
        let shape = AttnShape {
            heads: mc.num_heads,
            kv_heads: mc.num_kv_heads,
            head_dim: mc.head_dim,
            block_size: self.caps.block_size,
            scale: 1.0 / (mc.head_dim as f32).sqrt(),
        };
        let mut attn = CpuAttention { cache: &mut self.cache, input, token_seq, shape };
        self.model.forward(&batch, &mut attn)
    }
}

/// Attention for one forward pass: the cache plus this step's metadata.
struct CpuAttention<'a> {
    cache: &'a mut KvCache,
    input: &'a ModelInput,
    token_seq: Vec<u32>,
    shape: AttnShape,
}

/// A tensor's values as f32 on the host (a no-op cast for f32 compute).
fn host_f32(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    x.flatten_all()?.to_dtype(CandleDType::F32)?.to_vec1::<f32>()
}

impl AttentionBackend for CpuAttention<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let t = self.input.num_tokens();
        let (q_dtype, q, k, v) = (q.dtype(), host_f32(q)?, host_f32(k)?, host_f32(v)?);
        let row = self.shape.kv_heads * self.shape.head_dim;
        let (input, seqs, shape) = (self.input, &self.token_seq, self.shape);
        let out = match self.cache {
            KvCache::F32(layers) => {
                layers[layer].write(&k, &v, &input.slot_mapping, row);
                paged_attention(&layers[layer], &q, input, seqs, shape)
            }
            KvCache::F16(layers) => {
                layers[layer].write(&k, &v, &input.slot_mapping, row);
                paged_attention(&layers[layer], &q, input, seqs, shape)
            }
            KvCache::BF16(layers) => {
                layers[layer].write(&k, &v, &input.slot_mapping, row);
                paged_attention(&layers[layer], &q, input, seqs, shape)
            }
        };
        Tensor::from_vec(out, (t, shape.heads * shape.head_dim), &Device::Cpu)?.to_dtype(q_dtype)
    }
}

impl ModelExecutor for CpuExecutor {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError> {
        input.validate(self.caps.block_size, self.caps.num_blocks).map_err(ExecError::Input)?;
        if input.num_tokens() == 0 {
            return Ok(ModelOutput::Logits(Logits { vocab_size: self.caps.vocab_size, data: Vec::new() }));
        }
        let logits = self.forward(input).and_then(|l| host_f32(&l)).map_err(backend_err)?;
        Ok(ModelOutput::Logits(Logits::new(logits, self.caps.vocab_size)?))
    }
}
