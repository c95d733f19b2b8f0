//! Helpers for tests across the workspace: the real default model's path and
//! tiny random llama weights that tests generate themselves.

use std::path::PathBuf;

use candle_core::{D, DType, Device, Result, Tensor};

use crate::config::LlamaConfig;
use crate::linear::RawWeight;
use crate::llama::{AttentionBackend, BatchTokens, LayerWeights, Llama, ModelWeights};

/// File name of the default model in models/.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace's models/ folder.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// Path of the real SmolLM2 GGUF (`INFERD_TEST_MODEL` overrides). Panics
/// with the fix when it is missing: `make test` fetches it first.
pub fn smollm2_path() -> PathBuf {
    let path = std::env::var_os("INFERD_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| models_dir().join(SMOLLM2_FILE));
    assert!(path.exists(), "{} is missing: run `make model` (make test does it)", path.display());
    path
}

/// A tiny llama: 2 layers, hidden 64, 4 query heads over 2 KV heads, vocab 128.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        attention_bias: false,
        rope_interleaved: false,
    }
}

/// Deterministic pseudo-random values in about [-scale, scale].
pub fn random_tensor(shape: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// Dense random weights for `cfg` in Hugging Face layout (f32).
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Result<ModelWeights> {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let mut s = seed;
    let mut next = |shape: &[usize], scale: f32| {
        s += 1;
        random_tensor(shape, s, scale)
    };
    let w = 1.0 / (h as f32).sqrt();
    let mut layers = Vec::new();
    for _ in 0..cfg.num_layers {
        let qkv_bias = if cfg.attention_bias {
            Some([
                next(&[cfg.num_heads * d], 0.1)?,
                next(&[cfg.num_kv_heads * d], 0.1)?,
                next(&[cfg.num_kv_heads * d], 0.1)?,
            ])
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: (next(&[h], 0.1)? + 1.0)?,
            q: RawWeight::Dense(next(&[cfg.num_heads * d, h], w)?),
            k: RawWeight::Dense(next(&[cfg.num_kv_heads * d, h], w)?),
            v: RawWeight::Dense(next(&[cfg.num_kv_heads * d, h], w)?),
            qkv_bias,
            o: RawWeight::Dense(next(&[h, cfg.num_heads * d], w)?),
            ffn_norm: (next(&[h], 0.1)? + 1.0)?,
            gate: RawWeight::Dense(next(&[i, h], w)?),
            up: RawWeight::Dense(next(&[i, h], w)?),
            down: RawWeight::Dense(next(&[h, i], 1.0 / (i as f32).sqrt())?),
        });
    }
    let lm_head =
        if cfg.tie_word_embeddings { None } else { Some(RawWeight::Dense(next(&[cfg.vocab_size, h], w)?)) };
    Ok(ModelWeights {
        embed: RawWeight::Dense(next(&[cfg.vocab_size, h], 1.0)?),
        layers,
        norm: (next(&[h], 0.1)? + 1.0)?.to_dtype(DType::F32)?,
        lm_head,
        rope_freq_factors: None,
    })
}

/// Random weights for `cfg` made on `device` in `dtype` (normal, scaled by
/// fan-in), for benchmarks of large shapes: nothing is generated on the
/// host or copied.
pub fn random_weights_on(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<ModelWeights> {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let randn = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, device)?.to_dtype(dtype);
    let dense = |shape: &[usize], std: f32| randn(shape, std).map(RawWeight::Dense);
    let ones = |n: usize| Tensor::ones(n, dtype, device);
    let w = 1.0 / (h as f32).sqrt();
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        layers.push(LayerWeights {
            attn_norm: ones(h)?,
            q: dense(&[cfg.num_heads * d, h], w)?,
            k: dense(&[cfg.num_kv_heads * d, h], w)?,
            v: dense(&[cfg.num_kv_heads * d, h], w)?,
            qkv_bias: None,
            o: dense(&[h, cfg.num_heads * d], w)?,
            ffn_norm: ones(h)?,
            gate: dense(&[i, h], w)?,
            up: dense(&[i, h], w)?,
            down: dense(&[h, i], 1.0 / (i as f32).sqrt())?,
        });
    }
    let lm_head = if cfg.tie_word_embeddings { None } else { Some(dense(&[cfg.vocab_size, h], w)?) };
    Ok(ModelWeights {
        embed: dense(&[cfg.vocab_size, h], 1.0)?,
        layers,
        norm: ones(h)?,
        lm_head,
        rope_freq_factors: None,
    })
}

/// Attention over one sequence held contiguously, with candle ops and an
/// explicit causal mask: the plain reference the paged kernels are checked
/// against. Keys and values accumulate across calls, so it also decodes.
#[derive(Debug)]
pub struct ContiguousAttention {
    keys: Vec<Option<Tensor>>,
    values: Vec<Option<Tensor>>,
    /// Positions of the tokens of the current call.
    pub positions: Vec<u32>,
}

impl ContiguousAttention {
    pub fn new(num_layers: usize) -> Self {
        ContiguousAttention {
            keys: vec![None; num_layers],
            values: vec![None; num_layers],
            positions: Vec::new(),
        }
    }
}

impl AttentionBackend for ContiguousAttention {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let cat = |old: &Option<Tensor>, new: &Tensor| match old {
            Some(o) => Tensor::cat(&[o, new], 0),
            None => Ok(new.clone()),
        };
        let keys = cat(&self.keys[layer], k)?;
        let values = cat(&self.values[layer], v)?;
        self.keys[layer] = Some(keys.clone());
        self.values[layer] = Some(values.clone());
        let (t, heads, d) = q.dims3()?;
        let (n, kv_heads, _) = keys.dims3()?;
        let group = heads / kv_heads;
        // (n, kv_heads, d) -> (heads, n, d), each KV head serving `group` query heads.
        let rep =
            |x: &Tensor| x.transpose(0, 1)?.unsqueeze(1)?.repeat((1, group, 1, 1))?.reshape((heads, n, d));
        let q = q.transpose(0, 1)?.contiguous()?;
        let scores = (q.matmul(&rep(&keys)?.transpose(1, 2)?)? / (d as f64).sqrt())?;
        let mask: Vec<f32> = self
            .positions
            .iter()
            .flat_map(|&p| (0..n).map(move |j| if j as u32 <= p { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, t, n), &Device::Cpu)?.to_dtype(scores.dtype())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
        probs.matmul(&rep(&values)?)?.transpose(0, 1)?.reshape((t, heads * d))
    }
}

/// Logits of every position of `tokens`, computed in one contiguous pass.
pub fn reference_logits(model: &Llama, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
    let mut attn = ContiguousAttention::new(model.config().num_layers);
    attn.positions = (0..tokens.len() as u32).collect();
    let dev = Device::Cpu;
    let batch = BatchTokens {
        token_ids: Tensor::new(tokens, &dev)?,
        positions: Tensor::new(attn.positions.as_slice(), &dev)?,
        logits_rows: Tensor::arange(0u32, tokens.len() as u32, &dev)?,
    };
    model.forward(&batch, &mut attn)?.to_vec2()
}
