//! Loading llama-family weights from GGUF. llama.cpp's converter permutes
//! the rows of Q and K of `llama` models into the interleaved RoPE layout;
//! they are kept so, and the model applies interleaved RoPE to them.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::linear::RawWeight;
use crate::llama::{LayerWeights, ModelWeights};

/// An open GGUF file: its metadata and a reader for its tensors.
#[derive(Debug)]
pub struct GgufFile {
    pub content: gguf_file::Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| ModelError::Format { path: path.into(), reason: e.to_string() })?;
        Ok(GgufFile { content, reader })
    }

    fn qtensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        Ok(self.content.tensor(&mut self.reader, name, device)?)
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A 1-D tensor (norm weights, biases) in f32.
    fn vector(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        Ok(self.qtensor(name, device)?.dequantize(device)?)
    }

    /// Reads every weight of a llama-family model.
    pub fn weights(&mut self, cfg: &LlamaConfig, device: &Device) -> Result<ModelWeights> {
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            let q = self.qtensor(&format!("{p}.attn_q.weight"), device)?;
            let k = self.qtensor(&format!("{p}.attn_k.weight"), device)?;
            let qkv_bias = if cfg.attention_bias {
                Some([
                    self.vector(&format!("{p}.attn_q.bias"), device)?,
                    self.vector(&format!("{p}.attn_k.bias"), device)?,
                    self.vector(&format!("{p}.attn_v.bias"), device)?,
                ])
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: self.vector(&format!("{p}.attn_norm.weight"), device)?,
                q: RawWeight::Quantized(q),
                k: RawWeight::Quantized(k),
                v: RawWeight::Quantized(self.qtensor(&format!("{p}.attn_v.weight"), device)?),
                qkv_bias,
                o: RawWeight::Quantized(self.qtensor(&format!("{p}.attn_output.weight"), device)?),
                ffn_norm: self.vector(&format!("{p}.ffn_norm.weight"), device)?,
                gate: RawWeight::Quantized(self.qtensor(&format!("{p}.ffn_gate.weight"), device)?),
                up: RawWeight::Quantized(self.qtensor(&format!("{p}.ffn_up.weight"), device)?),
                down: RawWeight::Quantized(self.qtensor(&format!("{p}.ffn_down.weight"), device)?),
            });
        }
        let lm_head = if self.has("output.weight") {
            Some(RawWeight::Quantized(self.qtensor("output.weight", device)?))
        } else {
            None
        };
        let rope_freq_factors = if self.has("rope_freqs.weight") {
            Some(self.vector("rope_freqs.weight", device)?.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(ModelWeights {
            embed: RawWeight::Quantized(self.qtensor("token_embd.weight", device)?),
            layers,
            norm: self.vector("output_norm.weight", device)?,
            lm_head,
            rope_freq_factors,
        })
    }
}

/// What llama.cpp's converter does to a Hugging Face Q or K weight of
/// `(rows, cols)`: within each head, rotate-half row `j * head_dim / 2 + i`
/// moves to row `2i + j`, the interleaved layout.
pub fn permute_rows_for_gguf(t: &Tensor, num_heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let head_dim = rows / num_heads;
    t.reshape((num_heads, 2, head_dim / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}
