//! The llama-family forward over a packed batch: the scheduled tokens of
//! every sequence are concatenated into one `(T, hidden)` activation, each
//! token carries its own position, and attention is delegated to the
//! executor, which owns the paged KV cache.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Result, Tensor};
use tracing::trace_span;

use crate::config::LlamaConfig;
use crate::linear::{FusedLinear, RawWeight, WeightFormat};
use crate::rope::{RopeRows, RopeTable};

/// Attention over the KV cache, implemented by each executor.
pub trait AttentionBackend {
    /// For layer `layer`: store `k` and `v` (each `(T, kv_heads, head_dim)`,
    /// RoPE applied) in the cache, then attend each query row of `q`
    /// (`(T, heads, head_dim)`) to its own sequence's cached keys up to and
    /// including its position. Returns `(T, heads * head_dim)`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// As [`attend`](Self::attend), from the layer's joined projections
    /// before RoPE. The default splits them and rotates Q and K with candle;
    /// a backend may instead rotate each key as it writes it to its cache,
    /// so that Q and K are not copied and rotated as tensors first.
    fn attend_qkv(&mut self, layer: usize, qkv: &LayerQkv<'_>) -> Result<Tensor> {
        let (q, k, v) = qkv.split_rotated()?;
        self.attend(layer, &q, &k, &v)
    }
}

/// One layer's Q, K and V projections before RoPE, side by side as the
/// fused projection left them, with what rotating them takes.
#[derive(Debug, Clone, Copy)]
pub struct LayerQkv<'a> {
    /// `(T, (heads + 2 * kv_heads) * head_dim)`: each token's query heads,
    /// then its key heads, then its value heads.
    pub joined: &'a Tensor,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: &'a RopeRows,
}

impl LayerQkv<'_> {
    /// Q and K rotated, and V: `(T, heads, head_dim)`, `(T, kv_heads,
    /// head_dim)` twice, as [`AttentionBackend::attend`] takes them.
    pub fn split_rotated(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let (t, _) = self.joined.dims2()?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.joined.narrow(1, 0, h * d)?.reshape((t, h, d))?;
        let k = self.joined.narrow(1, h * d, kvh * d)?.reshape((t, kvh, d))?;
        let v = self.joined.narrow(1, (h + kvh) * d, kvh * d)?.contiguous()?.reshape((t, kvh, d))?;
        Ok((self.rope.apply(&q)?, self.rope.apply(&k)?, v))
    }
}

/// One decoder layer's weights as read from a file.
#[derive(Debug)]
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub q: RawWeight,
    pub k: RawWeight,
    pub v: RawWeight,
    /// Q, K and V biases (Qwen2).
    pub qkv_bias: Option<[Tensor; 3]>,
    pub o: RawWeight,
    pub ffn_norm: Tensor,
    pub gate: RawWeight,
    pub up: RawWeight,
    pub down: RawWeight,
}

/// A whole model's weights as read from a file, Q and K rows in the layout
/// `LlamaConfig::rope_interleaved` names.
#[derive(Debug)]
pub struct ModelWeights {
    pub embed: RawWeight,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<RawWeight>,
    /// Per-frequency RoPE divisors (GGUF `rope_freqs.weight`).
    pub rope_freq_factors: Option<Vec<f32>>,
}

impl ModelWeights {
    /// The same weights on `device` (dense ones as they are, quantized ones
    /// re-uploaded in their quantization).
    pub fn to_device(self, device: &Device) -> Result<Self> {
        let mv = |w: RawWeight| w.to_device(device);
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            let qkv_bias = match l.qkv_bias {
                Some([q, k, v]) => Some([q.to_device(device)?, k.to_device(device)?, v.to_device(device)?]),
                None => None,
            };
            layers.push(LayerWeights {
                attn_norm: l.attn_norm.to_device(device)?,
                q: mv(l.q)?,
                k: mv(l.k)?,
                v: mv(l.v)?,
                qkv_bias,
                o: mv(l.o)?,
                ffn_norm: l.ffn_norm.to_device(device)?,
                gate: mv(l.gate)?,
                up: mv(l.up)?,
                down: mv(l.down)?,
            });
        }
        Ok(ModelWeights {
            embed: mv(self.embed)?,
            layers,
            norm: self.norm.to_device(device)?,
            lm_head: self.lm_head.map(mv).transpose()?,
            rope_freq_factors: self.rope_freq_factors,
        })
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    qkv: FusedLinear,
    o: FusedLinear,
    ffn_norm: Tensor,
    gate_up: FusedLinear,
    down: FusedLinear,
}

/// What one forward pass computes: a packed batch of tokens.
#[derive(Debug, Clone)]
pub struct BatchTokens {
    /// `(T,)` u32 token ids.
    pub token_ids: Tensor,
    /// `(T,)` u32 positions within each token's own sequence.
    pub positions: Tensor,
    /// `(R,)` u32 rows of the batch whose logits are wanted.
    pub logits_rows: Tensor,
}

/// A llama-family decoder.
#[derive(Debug, Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: QMatMul,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: FusedLinear,
    rope: RopeTable,
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Builds the model in the given weight format and compute dtype
    /// (activations, norms, embeddings, RoPE tables and dense weights).
    /// `max_positions` bounds the RoPE tables (the served context length).
    pub fn new(
        cfg: LlamaConfig,
        weights: ModelWeights,
        format: WeightFormat,
        dtype: DType,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let rope = RopeTable::new(&cfg, max_positions, weights.rope_freq_factors.as_deref(), dtype, device)?;
        let linear =
            |parts: Vec<RawWeight>, bias: Option<Vec<Tensor>>| FusedLinear::new(parts, bias, format, dtype);
        let mut layers = Vec::with_capacity(weights.layers.len());
        for lw in weights.layers {
            let qkv_bias = lw.qkv_bias.map(|b| b.to_vec());
            layers.push(Layer {
                attn_norm: lw.attn_norm.to_dtype(dtype)?,
                qkv: linear(vec![lw.q, lw.k, lw.v], qkv_bias)?,
                o: linear(vec![lw.o], None)?,
                ffn_norm: lw.ffn_norm.to_dtype(dtype)?,
                gate_up: linear(vec![lw.gate, lw.up], None)?,
                down: linear(vec![lw.down], None)?,
            });
        }
        // Tied: the embedding matrix is also the output projection.
        let lm_head = match weights.lm_head {
            Some(head) => head,
            None => match &weights.embed {
                RawWeight::Quantized(q) if format.resolve(&weights.embed, device) == WeightFormat::Native => {
                    RawWeight::Quantized(copy_qtensor(q)?)
                }
                w => RawWeight::Dense(w.to_dtype(dtype)?),
            },
        };
        let lm_head = linear(vec![lm_head], None)?;
        let embed = embedding_table(weights.embed, format, dtype)?;
        let norm = weights.norm.to_dtype(dtype)?;
        Ok(Llama { cfg, embed, layers, norm, lm_head, rope, device: device.clone(), dtype })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations are computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Most positions the RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Runs the batch and returns `(R, vocab)` f32 logits for `logits_rows`.
    /// The attention backend gets each layer's joined q, k and v (before
    /// RoPE) in the compute dtype and returns its result in it.
    pub fn forward(&self, batch: &BatchTokens, attn: &mut dyn AttentionBackend) -> Result<Tensor> {
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps as f32;
        let (cos, sin) = self.rope.gather(&batch.positions)?;
        let rope = RopeRows { cos, sin, interleaved: cfg.rope_interleaved };
        let mut x = self.embed.embedding(&batch.token_ids)?.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let _span = trace_span!("layer", i).entered();
            let joined = layer.qkv.forward_normed_joined(&x, &layer.attn_norm, eps)?;
            let qkv = LayerQkv {
                joined: &joined,
                heads: cfg.num_heads,
                kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
                rope: &rope,
            };
            let a = attn.attend_qkv(i, &qkv)?;
            x = layer.o.forward_residual(&a, &x)?;
            let gate_up = layer.gate_up.forward_normed_joined(&x, &layer.ffn_norm, eps)?;
            x = layer.down.forward_swiglu_residual(&gate_up, &x)?;
        }
        let x = x.index_select(&batch.logits_rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        self.lm_head.forward_one(&x)?.to_dtype(DType::F32)
    }
}

/// A copy of a quantized matrix (QTensor is not Clone).
fn copy_qtensor(q: &candle_core::quantized::QTensor) -> Result<candle_core::quantized::QTensor> {
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(q.data()?.into_owned()),
        &q.device(),
        q.dtype(),
    )?;
    candle_core::quantized::QTensor::new(storage, q.shape())
}

/// The embedding table: kept quantized in the auto, native and q8_0 formats
/// (rows are dequantized on lookup), dense in the compute dtype otherwise.
fn embedding_table(w: RawWeight, format: WeightFormat, dtype: DType) -> Result<QMatMul> {
    match (format, w) {
        (WeightFormat::Dense, w) => Ok(QMatMul::Tensor(w.to_dtype(dtype)?)),
        (_, w) => w.into_matmul(format, dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_weights, random_weights_on, reference_logits, tiny_config};

    #[test]
    fn weights_moved_to_a_device_compute_the_same() -> Result<()> {
        let cfg = tiny_config();
        let tokens: Vec<u32> = (0..9).map(|i| (i * 31 + 7) % 128).collect();
        let build =
            |w: ModelWeights| Llama::new(cfg.clone(), w, WeightFormat::Native, DType::F32, 64, &Device::Cpu);
        let want = reference_logits(&build(random_weights(&cfg, 5)?)?, &tokens)?;
        let mut weights = random_weights(&cfg, 5)?;
        // A quantized matrix travels in its quantization.
        let up = weights.layers[0].up.to_dtype(DType::F32)?;
        weights.layers[0].up = RawWeight::Quantized(candle_core::quantized::QTensor::quantize(
            &up,
            candle_core::quantized::GgmlDType::Q8_0,
        )?);
        let moved = weights.to_device(&Device::Cpu)?;
        assert!(matches!(moved.layers[0].up, RawWeight::Quantized(_)));
        let got = reference_logits(&build(moved)?, &tokens)?;
        let diff =
            got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 0.05, "{diff}");
        Ok(())
    }

    #[test]
    fn random_weights_on_a_device_make_a_working_model() -> Result<()> {
        let cfg = tiny_config();
        let w = random_weights_on(&cfg, &Device::Cpu, DType::BF16)?;
        let RawWeight::Dense(q) = &w.layers[1].q else { panic!("dense") };
        assert_eq!((q.dims2()?, q.dtype()), ((cfg.num_heads * cfg.head_dim, cfg.hidden_size), DType::BF16));
        let model = Llama::new(cfg.clone(), w, WeightFormat::Dense, DType::BF16, 64, &Device::Cpu)?;
        let logits = reference_logits(&model, &[1, 2, 3])?;
        assert!(logits.iter().flatten().all(|x| x.is_finite()));
        Ok(())
    }
}
