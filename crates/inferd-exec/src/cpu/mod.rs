//! The CPU executor: a llama-family model whose attention reads and writes a
//! paged KV cache held in plain vectors.

mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_x86;
mod kv_cache;

use candle_core::{DType as CandleDType, Device, Storage, Tensor};
use inferd_contract::{
    Capabilities, DType, DeviceSpec, ExecError, Logits, ModelExecutor, ModelInput, ModelOutput,
};
use inferd_models::{AttentionBackend, BatchTokens, LayerQkv, Llama};

pub use attention::MAX_BLOCK_SIZE;
use attention::{AttnShape, paged_attention};
pub use kv_cache::block_bytes;
use kv_cache::{KvCache, RopeHost, parallel_slot_order};

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
        self.model.forward(&batch, &mut CpuAttention::new(&mut self.cache, input, shape))
    }
}

/// Attention for one forward pass: the cache plus this step's metadata.
struct CpuAttention<'a> {
    cache: &'a mut KvCache,
    input: &'a ModelInput,
    token_seq: Vec<u32>,
    shape: AttnShape,
    /// The step's RoPE rows on the host, taken at the first layer.
    rope: Option<(Vec<f32>, Vec<f32>)>,
    /// The step's [`parallel_slot_order`], for every layer's cache write.
    slot_order: Option<Vec<usize>>,
}

impl<'a> CpuAttention<'a> {
    fn new(cache: &'a mut KvCache, input: &'a ModelInput, shape: AttnShape) -> Self {
        let mut token_seq = vec![0u32; input.num_tokens()];
        for s in 0..input.num_seqs() {
            token_seq[input.query_range(s)].fill(s as u32);
        }
        let slot_order = parallel_slot_order(&input.slot_mapping);
        CpuAttention { cache, input, token_seq, shape, rope: None, slot_order }
    }
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

    /// In f32, RoPE is applied as the cache is written: one pass over the
    /// joined projections rotates the queries into the buffer attention
    /// reads and the keys into their slots, with candle's arithmetic (so the
    /// same bits as rotating first). Other dtypes rotate with candle first.
    fn attend_qkv(&mut self, layer: usize, qkv: &LayerQkv<'_>) -> candle_core::Result<Tensor> {
        let (shape, t) = (self.shape, self.input.num_tokens());
        let width = (shape.heads + 2 * shape.kv_heads) * shape.head_dim;
        let fits = (qkv.heads, qkv.kv_heads, qkv.head_dim) == (shape.heads, shape.kv_heads, shape.head_dim)
            && qkv.joined.dims2()? == (t, width);
        if qkv.joined.dtype() != CandleDType::F32 || !fits {
            let (q, k, v) = qkv.split_rotated()?;
            return self.attend(layer, &q, &k, &v);
        }
        let (cos, sin) = match &mut self.rope {
            Some(rows) => &*rows,
            none => none.insert((host_f32(&qkv.rope.cos)?, host_f32(&qkv.rope.sin)?)),
        };
        let rope = RopeHost {
            cos,
            sin,
            interleaved: qkv.rope.interleaved,
            heads: shape.heads,
            head_dim: shape.head_dim,
        };
        let joined = qkv.joined.contiguous()?;
        let (storage, layout) = joined.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("the CPU executor got a tensor off the CPU")
        };
        let x = &cpu.as_slice::<f32>()?[layout.start_offset()..][..t * width];
        let mut q = vec![0f32; t * shape.heads * shape.head_dim];
        let (input, seqs, slots) = (self.input, &self.token_seq, &self.input.slot_mapping);
        let order = self.slot_order.as_deref();
        let out = match self.cache {
            KvCache::F32(layers) => {
                layers[layer].write_rotated(x, rope, slots, order, &mut q);
                paged_attention(&layers[layer], &q, input, seqs, shape)
            }
            KvCache::F16(layers) => {
                layers[layer].write_rotated(x, rope, slots, order, &mut q);
                paged_attention(&layers[layer], &q, input, seqs, shape)
            }
            KvCache::BF16(layers) => {
                layers[layer].write_rotated(x, rope, slots, order, &mut q);
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
        if input.num_tokens() == 0 {
            return Ok(ModelOutput::Logits(Logits { vocab_size: self.caps.vocab_size, data: Vec::new() }));
        }
        let logits = self.forward(input).and_then(|l| host_f32(&l)).map_err(backend_err)?;
        Ok(ModelOutput::Logits(Logits::new(logits, self.caps.vocab_size)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType as CandleDType;
    use inferd_core::RequestId;
    use inferd_models::LlamaConfig;
    use inferd_models::rope::{RopeRows, RopeTable};
    use inferd_models::testing::tiny_config;

    fn bits(t: &Tensor) -> Vec<u32> {
        host_f32(t).unwrap().iter().map(|x| x.to_bits()).collect()
    }

    fn cache_bits(cache: &KvCache) -> Vec<u32> {
        fn of<T: kv_cache::KvElem>(layers: &[kv_cache::LayerKv<T>]) -> Vec<u32> {
            layers.iter().flat_map(|l| l.k.iter().chain(&l.v)).map(|x| x.to_f32().to_bits()).collect()
        }
        match cache {
            KvCache::F32(l) => of(l),
            KvCache::F16(l) => of(l),
            KvCache::BF16(l) => of(l),
        }
    }

    /// RoPE fused into the cache write gives the bits of rotating Q and K
    /// with candle first and then writing and attending: the same cache
    /// contents and the same attention output, for every cache dtype and
    /// both RoPE layouts, over a mixed step (a prompt chunk after cached
    /// tokens, and a decode token) that follows an earlier step.
    #[test]
    fn rope_fused_into_the_cache_write_equals_rotating_first() -> candle_core::Result<()> {
        let (heads, kv_heads, head_dim, bs) = (6, 2, 16, 4);
        let shape = AttnShape { heads, kv_heads, head_dim, block_size: bs, scale: 0.25 };
        let width = (heads + 2 * kv_heads) * head_dim;
        let cfg = LlamaConfig {
            hidden_size: heads * head_dim,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            ..tiny_config()
        };
        let table = RopeTable::new(&cfg, 64, None, CandleDType::F32, &Device::Cpu)?;
        let (a_blocks, b_blocks) = ([5u32, 1, 7, 2], [0u32, 3]);
        // Step 1: 6 prompt tokens of A, 3 of B. Step 2: 5 more of A, 1 of B.
        let steps = [[(0, 6), (0, 3)], [(6, 5), (3, 1)]];
        for kv in [DType::F32, DType::F16, DType::BF16] {
            for interleaved in [false, true] {
                let mut fused = KvCache::new(kv, 2, 8 * bs * kv_heads * head_dim);
                let mut split = KvCache::new(kv, 2, 8 * bs * kv_heads * head_dim);
                for (n, step) in steps.iter().enumerate() {
                    let mut input = ModelInput::new(0);
                    for (s, &(start, len)) in step.iter().enumerate() {
                        let blocks: &[u32] = if s == 0 { &a_blocks } else { &b_blocks };
                        let tokens: Vec<u32> = (start..start + len).map(|i| i as u32).collect();
                        input.push_seq(RequestId(s as u64), &tokens, start, blocks, bs, true);
                    }
                    let t = input.num_tokens();
                    let joined = Tensor::randn(0f32, 2.0, (t, width), &Device::Cpu)?;
                    let positions = Tensor::from_slice(&input.positions, t, &Device::Cpu)?;
                    let (cos, sin) = table.gather(&positions)?;
                    let rope = RopeRows { cos, sin, interleaved };
                    let qkv = LayerQkv { joined: &joined, heads, kv_heads, head_dim, rope: &rope };
                    let layer = n % 2;
                    let got = CpuAttention::new(&mut fused, &input, shape).attend_qkv(layer, &qkv)?;
                    let (q, k, v) = qkv.split_rotated()?;
                    let want = CpuAttention::new(&mut split, &input, shape).attend(layer, &q, &k, &v)?;
                    assert_eq!(bits(&got), bits(&want), "{kv:?} cache, interleaved {interleaved}, step {n}");
                }
                assert_eq!(cache_bits(&fused), cache_bits(&split), "{kv:?} cache, interleaved {interleaved}");
                assert!(cache_bits(&fused).iter().any(|&b| b != 0), "the cache was written");
            }
        }
        Ok(())
    }
}
