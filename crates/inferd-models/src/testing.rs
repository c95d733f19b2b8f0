//! Helpers for tests across the workspace: the real default model's path and
//! tiny random llama weights that tests generate themselves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType, Device, Result, Tensor};

use crate::config::LlamaConfig;
use crate::gguf::{GgufFile, permute_rows_for_gguf};
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

fn dense(w: &RawWeight) -> Tensor {
    match w {
        RawWeight::Dense(t) => t.clone(),
        RawWeight::Quantized(_) => unreachable!("random weights are dense"),
    }
}

fn io_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Writes `w` as a Hugging Face folder: config.json and the weights in
/// `dtype`, in one model.safetensors or, for `shards > 1`, that many files
/// with a model.safetensors.index.json.
pub fn write_hf(dir: &Path, cfg: &LlamaConfig, w: &ModelWeights, dtype: DType, shards: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io_err)?;
    let mut t: Vec<(String, Tensor)> = Vec::new();
    let mut put = |name: String, x: &Tensor| -> Result<()> {
        t.push((name, x.to_dtype(dtype)?));
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &dense(&w.embed))?;
    put("model.norm.weight".into(), &w.norm)?;
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &l.attn_norm)?;
        put(format!("{p}.post_attention_layernorm.weight"), &l.ffn_norm)?;
        put(format!("{p}.self_attn.q_proj.weight"), &dense(&l.q))?;
        put(format!("{p}.self_attn.k_proj.weight"), &dense(&l.k))?;
        put(format!("{p}.self_attn.v_proj.weight"), &dense(&l.v))?;
        put(format!("{p}.self_attn.o_proj.weight"), &dense(&l.o))?;
        put(format!("{p}.mlp.gate_proj.weight"), &dense(&l.gate))?;
        put(format!("{p}.mlp.up_proj.weight"), &dense(&l.up))?;
        put(format!("{p}.mlp.down_proj.weight"), &dense(&l.down))?;
    }
    if shards <= 1 {
        let all: HashMap<String, Tensor> = t.into_iter().collect();
        return candle_core::safetensors::save(&all, dir.join("model.safetensors"));
    }
    let mut weight_map = serde_json::Map::new();
    let per = t.len().div_ceil(shards);
    for (k, part) in t.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        for (name, _) in part {
            weight_map.insert(name.clone(), file.clone().into());
        }
        let part: HashMap<String, Tensor> = part.iter().cloned().collect();
        candle_core::safetensors::save(&part, dir.join(&file))?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).map_err(io_err)
}

/// Writes `w` as a GGUF F32 file (Q/K rows permuted as llama.cpp's
/// converter does), with `extra` metadata (a tokenizer, say).
pub fn write_gguf(path: &Path, cfg: &LlamaConfig, w: &ModelWeights, extra: &[(String, Value)]) -> Result<()> {
    let q = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32);
    let mut tensors: Vec<(String, QTensor)> =
        vec![("token_embd.weight".into(), q(&dense(&w.embed))?), ("output_norm.weight".into(), q(&w.norm)?)];
    for (i, l) in w.layers.iter().enumerate() {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_norm.weight"), q(&l.attn_norm)?));
        tensors.push((format!("{p}.ffn_norm.weight"), q(&l.ffn_norm)?));
        tensors
            .push((format!("{p}.attn_q.weight"), q(&permute_rows_for_gguf(&dense(&l.q), cfg.num_heads)?)?));
        tensors.push((
            format!("{p}.attn_k.weight"),
            q(&permute_rows_for_gguf(&dense(&l.k), cfg.num_kv_heads)?)?,
        ));
        tensors.push((format!("{p}.attn_v.weight"), q(&dense(&l.v))?));
        tensors.push((format!("{p}.attn_output.weight"), q(&dense(&l.o))?));
        tensors.push((format!("{p}.ffn_gate.weight"), q(&dense(&l.gate))?));
        tensors.push((format!("{p}.ffn_up.weight"), q(&dense(&l.up))?));
        tensors.push((format!("{p}.ffn_down.weight"), q(&dense(&l.down))?));
    }
    let u = |x: usize| Value::U32(x as u32);
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.block_count".into(), u(cfg.num_layers)),
        ("llama.attention.head_count".into(), u(cfg.num_heads)),
        ("llama.attention.head_count_kv".into(), u(cfg.num_kv_heads)),
        ("llama.vocab_size".into(), u(cfg.vocab_size)),
        ("llama.context_length".into(), u(cfg.max_position_embeddings)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(cfg.rms_norm_eps as f32)),
        ("llama.rope.freq_base".into(), Value::F32(cfg.rope_theta)),
    ];
    metadata.extend(extra.iter().cloned());
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(io_err)?;
    let mut f = std::fs::File::create(path).map_err(io_err)?;
    gguf_file::write(&mut f, &md, &ts)
}

/// A tiny random llama that inferd can serve: SmolLM2's tokenizer and chat
/// template (read from the real model) over 2 random layers, written as a
/// Hugging Face folder (`hf/`, f16, in `shards` safetensors files) and as a
/// GGUF F32 file (`tiny.gguf`) under `root`; about 6 and 13 MB. Returns
/// both paths.
pub fn write_servable_tiny(root: &Path, shards: usize, seed: u64) -> crate::Result<(PathBuf, PathBuf)> {
    let real = GgufFile::open(&smollm2_path())?;
    let tokenizer = crate::TextTokenizer::from_gguf(&real.content)?;
    let cfg =
        LlamaConfig { vocab_size: tokenizer.vocab_size(), max_position_embeddings: 2048, ..tiny_config() };
    let weights = random_weights(&cfg, seed)?;
    let hf = root.join("hf");
    write_hf(&hf, &cfg, &weights, DType::F16, shards)?;
    let json = tokenizer.inner().to_string(false).map_err(|e| crate::ModelError::Tokenizer(e.to_string()))?;
    let io = |path: PathBuf| move |source| crate::ModelError::Io { path, source };
    std::fs::write(hf.join("tokenizer.json"), json).map_err(io(hf.join("tokenizer.json")))?;
    let text = |key: &str| real.content.metadata.get(key).and_then(|v| v.to_string().ok()).cloned();
    let token = |key: &str| {
        real.content.metadata.get(key).and_then(|v| v.to_u32().ok()).and_then(|id| tokenizer.id_to_token(id))
    };
    let tok_cfg = serde_json::json!({
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "chat_template": text("tokenizer.chat_template"),
    });
    std::fs::write(hf.join("tokenizer_config.json"), tok_cfg.to_string())
        .map_err(io(hf.join("tokenizer_config.json")))?;
    let extra: Vec<(String, Value)> = real
        .content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let gguf = root.join("tiny.gguf");
    write_gguf(&gguf, &cfg, &weights, &extra)?;
    Ok((hf, gguf))
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
