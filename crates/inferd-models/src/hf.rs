//! Loading a Hugging Face model folder: config.json, model.safetensors or a
//! sharded index, in f32, f16 or bf16 as stored (the model converts them to
//! its compute dtype once, at load).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::linear::RawWeight;
use crate::llama::{LayerWeights, ModelWeights};

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.into(), source })
}

fn format_err(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Format { path: path.into(), reason: reason.into() }
}

/// The config of a Hugging Face model folder.
pub fn config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    LlamaConfig::from_hf_json(&read(&path)?).map_err(|reason| format_err(&path, reason))
}

/// The shard files a `model.safetensors.index.json` names, sorted.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let json: serde_json::Value =
        serde_json::from_str(&read(index)?).map_err(|e| format_err(index, e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format_err(index, "no weight_map object"))?;
    let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    Ok(files.into_iter().map(String::from).collect())
}

/// The safetensors files of a folder: `model.safetensors`, or every shard
/// that `model.safetensors.index.json` names.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(format_err(dir, "no model.safetensors or model.safetensors.index.json"));
    }
    Ok(shard_names(&index)?.into_iter().map(|f| dir.join(f)).collect())
}

struct Source {
    st: MmapedSafetensors,
    device: Device,
    dir: PathBuf,
}

impl Source {
    fn get(&self, name: &str) -> Result<Tensor> {
        let t =
            self.st.load(name, &Device::Cpu).map_err(|e| format_err(&self.dir, format!("{name}: {e}")))?;
        Ok(t.to_device(&self.device)?)
    }

    fn matrix(&self, name: &str) -> Result<RawWeight> {
        Ok(RawWeight::Dense(self.get(name)?))
    }

    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
}

/// Reads every weight of a llama-family model from a Hugging Face folder.
pub fn weights(dir: &Path, cfg: &LlamaConfig, device: &Device) -> Result<ModelWeights> {
    let paths = shard_paths(dir)?;
    // SAFETY: the files are memory-mapped read-only; inferd does not modify
    // model files while serving, and the catalogue pins their checksums.
    let st = unsafe { MmapedSafetensors::multi(&paths) }.map_err(|e| format_err(dir, e.to_string()))?;
    let src = Source { st, device: device.clone(), dir: dir.into() };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let qkv_bias = if cfg.attention_bias {
            Some([
                src.get(&format!("{p}.self_attn.q_proj.bias"))?,
                src.get(&format!("{p}.self_attn.k_proj.bias"))?,
                src.get(&format!("{p}.self_attn.v_proj.bias"))?,
            ])
        } else {
            None
        };
        layers.push(LayerWeights {
            attn_norm: src.get(&format!("{p}.input_layernorm.weight"))?,
            q: src.matrix(&format!("{p}.self_attn.q_proj.weight"))?,
            k: src.matrix(&format!("{p}.self_attn.k_proj.weight"))?,
            v: src.matrix(&format!("{p}.self_attn.v_proj.weight"))?,
            qkv_bias,
            o: src.matrix(&format!("{p}.self_attn.o_proj.weight"))?,
            ffn_norm: src.get(&format!("{p}.post_attention_layernorm.weight"))?,
            gate: src.matrix(&format!("{p}.mlp.gate_proj.weight"))?,
            up: src.matrix(&format!("{p}.mlp.up_proj.weight"))?,
            down: src.matrix(&format!("{p}.mlp.down_proj.weight"))?,
        });
    }
    let lm_head = if !cfg.tie_word_embeddings && src.has("lm_head.weight") {
        Some(src.matrix("lm_head.weight")?)
    } else {
        None
    };
    Ok(ModelWeights {
        embed: src.matrix("model.embed_tokens.weight")?,
        layers,
        norm: src.get("model.norm.weight")?,
        lm_head,
        rope_freq_factors: None,
    })
}
