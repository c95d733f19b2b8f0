//! The CPU executor: a llama-family model whose attention reads and writes a
//! paged KV cache held in plain vectors.

mod attention;
mod kv_cache;

use candle_core::{Device, Tensor};
use inferd_models::{AttentionBackend, BatchTokens, Llama};

pub use attention::MAX_BLOCK_SIZE;
use attention::{AttnShape, paged_attention};
use kv_cache::KvCache;
pub use kv_cache::{KvDtype, block_bytes};

use crate::{Capabilities, ExecError, ModelExecutor, ModelInput, ModelOutput};

/// How the CPU executor sizes its cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuExecutorConfig {
    pub block_size: usize,
    /// Bytes for the KV cache; the number of blocks follows from it.
    pub kv_cache_memory: usize,
    pub kv_dtype: KvDtype,
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
            return Err(ExecError::Input(format!(
                "block size must be in [1, {MAX_BLOCK_SIZE}], got {}",
                cfg.block_size
            )));
        }
        let per_block =
            block_bytes(mc.num_layers, cfg.block_size, mc.num_kv_heads, mc.head_dim, cfg.kv_dtype);
        let num_blocks = cfg.kv_cache_memory / per_block;
        if num_blocks == 0 {
            return Err(ExecError::CacheTooSmall { budget: cfg.kv_cache_memory, block_bytes: per_block });
        }
        let elems = num_blocks * cfg.block_size * mc.num_kv_heads * mc.head_dim;
        let caps = Capabilities {
            block_size: cfg.block_size,
            num_blocks,
            max_model_len: cfg.max_model_len.min(model.max_positions()),
            vocab_size: mc.vocab_size,
            shape_buckets: None,
        };
        Ok(CpuExecutor { cache: KvCache::new(cfg.kv_dtype, mc.num_layers, elems), model, caps })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }
}

/// Attention for one forward pass: the cache plus this step's metadata.
struct CpuAttention<'a> {
    cache: &'a mut KvCache,
    input: &'a ModelInput,
    token_seq: Vec<u32>,
    shape: AttnShape,
}

impl AttentionBackend for CpuAttention<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let t = self.input.num_tokens();
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
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
        };
        Tensor::from_vec(out, (t, shape.heads * shape.head_dim), &Device::Cpu)
    }
}

impl ModelExecutor for CpuExecutor {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError> {
        input.validate(self.caps.block_size, self.caps.num_blocks).map_err(ExecError::Input)?;
        let mc = self.model.config();
        let t = input.num_tokens();
        let mut token_seq = vec![0u32; t];
        for s in 0..input.num_seqs() {
            let (a, b) = (input.query_start[s] as usize, input.query_start[s + 1] as usize);
            token_seq[a..b].fill(s as u32);
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
        let logits = self.model.forward(&batch, &mut attn)?;
        Ok(ModelOutput { logits })
    }
}
