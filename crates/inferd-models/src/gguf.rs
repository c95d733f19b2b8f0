//! Loading llama-family weights from GGUF. llama.cpp's converter permutes
//! the rows of Q and K of `llama` models into the interleaved RoPE layout;
//! they are kept so, and the model applies interleaved RoPE to them.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::linear::RawWeight;
use crate::llama::{LayerWeights, ModelWeights};

/// An open GGUF file: its metadata and a reader for its tensors.
#[derive(Debug)]
pub struct GgufFile<R = BufReader<File>> {
    pub content: gguf_file::Content,
    reader: R,
    path: PathBuf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
        GgufFile::from_reader(BufReader::new(file), path)
    }
}

impl<R: Read + Seek> GgufFile<R> {
    /// Reads the header of a GGUF file from `reader`; `path` names it in
    /// errors. A truncated or hostile header is an error, never a panic.
    pub fn from_reader(mut reader: R, path: &Path) -> Result<Self> {
        let format = |reason: String| ModelError::Format { path: path.into(), reason };
        let len =
            reader.seek(SeekFrom::End(0)).map_err(|source| ModelError::Io { path: path.into(), source })?;
        reader.seek(SeekFrom::Start(0)).map_err(|source| ModelError::Io { path: path.into(), source })?;
        // candle's parser has panicked on crafted headers (a zero
        // alignment, dimensions whose product overflows): contain it.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => return Err(format(e.to_string())),
            Err(_) => return Err(format("the GGUF header is malformed".into())),
        };
        for (name, info) in &content.tensor_infos {
            check_tensor_info(name, info, content.tensor_data_offset, len).map_err(format)?;
        }
        Ok(GgufFile { content, reader, path: path.into() })
    }

    /// A tensor whose extent `from_reader` already checked.
    fn qtensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Err(ModelError::Format { path: self.path.clone(), reason: format!("no tensor {name}") });
        };
        Ok(info.read(&mut self.reader, self.content.tensor_data_offset, device)?)
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

/// Checks what candle would compute from a tensor's header entry before it
/// does: the element count without overflow, whole blocks, and data that
/// lies inside the file (so nothing is allocated for bytes that are not there).
fn check_tensor_info(
    name: &str,
    info: &gguf_file::TensorInfo,
    data_offset: u64,
    file_len: u64,
) -> std::result::Result<(), String> {
    let dims = info.shape.dims();
    let elems = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor {name}: dimensions {dims:?} overflow"))?;
    let block = info.ggml_dtype.block_size();
    if !elems.is_multiple_of(block) {
        return Err(format!("tensor {name}: {elems} elements are not whole blocks of {block}"));
    }
    let bytes = (elems / block)
        .checked_mul(info.ggml_dtype.type_size())
        .ok_or_else(|| format!("tensor {name}: its size overflows"))? as u64;
    let end = data_offset.checked_add(info.offset).and_then(|start| start.checked_add(bytes));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!(
            "tensor {name}: {bytes} bytes at offset {} lie beyond the file's {file_len} bytes",
            info.offset
        )),
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

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use candle_core::quantized::{GgmlDType, QTensor};
    use gguf_file::Value;

    use super::*;

    /// A small GGUF file with the given metadata and one f32 tensor.
    fn file(metadata: &[(&str, Value)]) -> Vec<u8> {
        let t = QTensor::quantize(
            &Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let mut out = Cursor::new(Vec::new());
        gguf_file::write(&mut out, &md, &[("w", &t)]).unwrap();
        out.into_inner()
    }

    fn open(bytes: Vec<u8>) -> Result<GgufFile<Cursor<Vec<u8>>>> {
        GgufFile::from_reader(Cursor::new(bytes), Path::new("test.gguf"))
    }

    #[test]
    fn a_good_file_opens_and_reads_its_tensor() {
        let mut f = open(file(&[("general.architecture", Value::String("llama".into()))])).unwrap();
        assert_eq!(f.qtensor("w", &Device::Cpu).unwrap().shape().dims(), &[4, 8]);
        assert!(matches!(f.qtensor("missing", &Device::Cpu), Err(ModelError::Format { .. })));
    }

    #[test]
    fn truncated_and_hostile_files_are_format_errors_not_panics() {
        let good = file(&[("general.architecture", Value::String("llama".into()))]);
        // Every truncation: the header cut anywhere, or the tensor's data missing.
        for cut in (0..good.len()).step_by(7) {
            let err = open(good[..cut].to_vec()).and_then(|mut f| f.qtensor("w", &Device::Cpu).map(|_| ()));
            assert!(
                matches!(err, Err(ModelError::Format { .. }) | Err(ModelError::Io { .. })),
                "cut at {cut}"
            );
        }
        // An alignment of 0 made candle divide by zero.
        let zero = file(&[("general.alignment", Value::U32(0))]);
        assert!(matches!(open(zero), Err(ModelError::Format { .. })));
    }

    #[test]
    fn a_tensor_whose_data_lies_beyond_the_file_is_refused_before_allocating() {
        let mut bytes = file(&[]);
        // The tensor entry: name "w", 2 dims (u32), two u64 dims, dtype
        // (u32), then its u64 offset; point that far away.
        let name_at = bytes.iter().position(|&b| b == b'w').unwrap();
        let offset_at = name_at + 1 + 4 + 16 + 4;
        bytes[offset_at..offset_at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
        let err = open(bytes).unwrap_err().to_string();
        assert!(err.contains("beyond the file"), "{err}");
    }

    #[test]
    fn the_fuzzers_seed_model_loads_whole() {
        // fuzz/seeds/gguf/tiny.gguf: a one-layer llama with every tensor the
        // loader reads, so the gguf fuzz target starts from a file that
        // reaches the weights.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/gguf/tiny.gguf");
        let mut f = GgufFile::open(&path).unwrap();
        let cfg = LlamaConfig::from_gguf(&f.content).unwrap();
        assert_eq!((cfg.num_layers, cfg.hidden_size, cfg.vocab_size), (1, 8, 4));
        let w = f.weights(&cfg, &Device::Cpu).unwrap();
        assert_eq!(w.layers.len(), 1);
    }

    #[test]
    fn a_config_out_of_range_is_refused() {
        let md = |heads: u32| {
            vec![
                ("general.architecture", Value::String("llama".into())),
                ("llama.embedding_length", Value::U32(64)),
                ("llama.attention.head_count", Value::U32(heads)),
                ("llama.feed_forward_length", Value::U32(128)),
                ("llama.block_count", Value::U32(2)),
                ("llama.vocab_size", Value::U32(100)),
                ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ]
        };
        let f = open(file(&md(4))).unwrap();
        assert_eq!(LlamaConfig::from_gguf(&f.content).unwrap().head_dim, 16);
        let f = open(file(&md(0))).unwrap();
        let err = LlamaConfig::from_gguf(&f.content).unwrap_err().to_string();
        assert!(err.contains("num_heads is 0"), "{err}");
    }
}
