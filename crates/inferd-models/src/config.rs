use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// Llama-3 style frequency scaling of RoPE (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The shape of a llama-family model; Llama 2/3, SmolLM2, Mistral and Qwen2
/// all fit it (Qwen2 adds biases on the Q, K and V projections).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// RoPE rotates adjacent pairs (GGUF `llama` files, whose Q/K rows
    /// llama.cpp permuted) instead of the two halves (Hugging Face).
    pub rope_interleaved: bool,
}

const SUPPORTED: [&str; 3] = ["llama", "qwen2", "mistral"];

fn md<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content.metadata.get(key).ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
}

fn md_usize(content: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = md(content, key)?;
    let n = v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64));
    n.map(|n| n as usize).map_err(|_| ModelError::MissingMetadata(key.to_string()))
}

fn md_f32(content: &gguf_file::Content, key: &str) -> Result<f32> {
    md(content, key)?.to_f32().map_err(|_| ModelError::MissingMetadata(key.to_string()))
}

impl LlamaConfig {
    /// Reads the `{arch}.*` keys of a GGUF file.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let arch = md(content, "general.architecture")?
            .to_string()
            .map_err(|_| ModelError::MissingMetadata("general.architecture".into()))?
            .clone();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = md_usize(content, &key("embedding_length"))?;
        let num_heads = md_usize(content, &key("attention.head_count"))?;
        let num_kv_heads = md_usize(content, &key("attention.head_count_kv")).unwrap_or(num_heads);
        let head_dim =
            md_usize(content, &key("attention.key_length")).unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match md_usize(content, &key("vocab_size")) {
            Ok(v) => v,
            Err(_) => md(content, "tokenizer.ggml.tokens")?.to_vec().map(Vec::len)?,
        };
        LlamaConfig {
            hidden_size,
            intermediate_size: md_usize(content, &key("feed_forward_length"))?,
            num_layers: md_usize(content, &key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: f64::from(md_f32(content, &key("attention.layer_norm_rms_epsilon"))?),
            rope_theta: md_f32(content, &key("rope.freq_base")).unwrap_or(10_000.0),
            // GGUF carries Llama-3 scaling as a `rope_freqs.weight` tensor instead.
            rope_scaling: None,
            max_position_embeddings: md_usize(content, &key("context_length")).unwrap_or(4096),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            // Only llama.cpp's `llama` converter permutes Q/K (Mistral ships as `llama`).
            rope_interleaved: arch == "llama" || arch == "mistral",
            architecture: arch,
        }
        .checked()
    }

    /// The configuration if every size is in range, so no later arithmetic
    /// divides by zero, overflows or allocates without bound: a model file
    /// is input too.
    pub fn checked(self) -> Result<Self> {
        let bad = |what: String| Err(ModelError::BadConfig(what));
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 20),
            ("num_layers", self.num_layers, 1024),
            ("num_heads", self.num_heads, 1024),
            ("num_kv_heads", self.num_kv_heads, 1024),
            ("head_dim", self.head_dim, 1024),
            ("vocab_size", self.vocab_size, 1 << 22),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} is {v}, must be in [1, {max}]"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} is odd; RoPE needs pairs", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(format!("rms_norm_eps {} must be in (0, 1)", self.rms_norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} must be a finite number above 1", self.rope_theta));
        }
        if let Some(s) = &self.rope_scaling {
            let ok =
                [s.factor, s.low_freq_factor, s.high_freq_factor].iter().all(|f| f.is_finite() && *f > 0.0)
                    && s.high_freq_factor > s.low_freq_factor
                    && s.original_max_position_embeddings > 0;
            if !ok {
                return bad(format!("rope_scaling {s:?} is out of range"));
            }
        }
        Ok(self)
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> std::result::Result<Self, String> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            model_type: String,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            vocab_size: usize,
            rms_norm_eps: f64,
            #[serde(default = "default_theta")]
            rope_theta: f32,
            rope_scaling: Option<serde_json::Value>,
            #[serde(default = "default_max_pos")]
            max_position_embeddings: usize,
            #[serde(default)]
            tie_word_embeddings: bool,
            attention_bias: Option<bool>,
        }
        fn default_theta() -> f32 {
            10_000.0
        }
        fn default_max_pos() -> usize {
            4096
        }
        let hf: Hf = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let arch = if hf.model_type.is_empty() { "llama".to_string() } else { hf.model_type };
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(format!("unsupported model_type {arch:?} (supported: llama, qwen2, mistral)"));
        }
        let rope_scaling = match hf.rope_scaling {
            Some(v) if v.get("rope_type").or(v.get("type")).and_then(|t| t.as_str()) == Some("llama3") => {
                Some(serde_json::from_value(v).map_err(|e| format!("rope_scaling: {e}"))?)
            }
            _ => None,
        };
        LlamaConfig {
            attention_bias: hf.attention_bias.unwrap_or(arch == "qwen2"),
            architecture: arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            rope_interleaved: false,
        }
        .checked()
        .map_err(|e| e.to_string())
    }
}
