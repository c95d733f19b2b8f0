//! Rotary position embeddings with per-token positions. Every sequence in a
//! packed batch has its own positions, so cos/sin rows are gathered per token.
//! Two layouts: rotate-half (Hugging Face) and interleaved pairs (GGUF llama
//! files, whose Q/K rows llama.cpp permuted). Applying the file's own layout,
//! rather than permuting rows back, keeps the arithmetic llama.cpp does.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{Llama3RopeScaling, LlamaConfig};

/// Precomputed cos and sin for every position up to the context length.
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

/// Llama 3's frequency scaling: long wavelengths slowed by `factor`, short
/// ones kept, a smooth blend between.
fn llama3_scale(inv_freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old = s.original_max_position_embeddings as f32;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
    if wavelen < high_wavelen {
        inv_freq
    } else if wavelen > low_wavelen {
        inv_freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

impl RopeTable {
    /// Tables for `max_positions` positions, computed in f32 and held in
    /// `dtype`. `freq_factors` (GGUF's `rope_freqs.weight`) divide the
    /// inverse frequencies when present.
    pub fn new(
        cfg: &LlamaConfig,
        max_positions: usize,
        freq_factors: Option<&[f32]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dim = cfg.head_dim;
        let inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let f = 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / dim as f32);
                let f = match &cfg.rope_scaling {
                    Some(s) => llama3_scale(f, s),
                    None => f,
                };
                freq_factors.and_then(|ff| ff.get(i)).map_or(f, |factor| f / factor)
            })
            .collect();
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
        let t = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        Ok(RopeTable { cos: freqs.cos()?.to_dtype(dtype)?, sin: freqs.sin()?.to_dtype(dtype)? })
    }

    /// Number of positions covered.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// cos and sin rows for each token's position: two `(T, head_dim / 2)` tensors.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }

    /// Rotates `x` of shape `(T, heads, head_dim)` by the gathered rows.
    /// Each token is its own batch entry of length 1, so both layouts work
    /// on views of `x` without transposing it.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
        let (t, heads, dim) = x.dims3()?;
        let cos = cos.reshape((t, 1, dim / 2))?;
        let sin = sin.reshape((t, 1, dim / 2))?;
        let x = x.contiguous()?;
        let y = if interleaved {
            // rope_i wants (batch, heads, seq, dim).
            candle_nn::rotary_emb::rope_i(&x.reshape((t, heads, 1, dim))?, &cos, &sin)?
        } else {
            // rope_thd wants (batch, seq, heads, dim).
            candle_nn::rotary_emb::rope_thd(&x.reshape((t, 1, heads, dim))?, &cos, &sin)?
        };
        y.reshape((t, heads, dim))
    }
}

/// Each token's cos and sin rows for one forward pass (two `(T, head_dim /
/// 2)` tensors, gathered once for all layers) and the layout they rotate.
#[derive(Debug, Clone)]
pub struct RopeRows {
    pub cos: Tensor,
    pub sin: Tensor,
    pub interleaved: bool,
}

impl RopeRows {
    /// [`RopeTable::apply`] with these rows.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        RopeTable::apply(x, &self.cos, &self.sin, self.interleaved)
    }
}

/// Rotates one head (`x`, `head_dim` values) by one token's `cos` and `sin`
/// rows (`head_dim / 2` each), handing each result to `put(index, value)`.
/// The arithmetic is that of candle's `rope_i` (interleaved) and `rope_thd`
/// (rotate-half) in f32, so a backend that rotates as it writes its cache
/// gets the same bits as [`RopeTable::apply`].
#[inline]
pub fn rotate_head(x: &[f32], cos: &[f32], sin: &[f32], interleaved: bool, mut put: impl FnMut(usize, f32)) {
    let half = x.len() / 2;
    let (cos, sin) = (&cos[..half], &sin[..half]);
    for i in 0..half {
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x0, x1) = (x[a], x[b]);
        put(a, x0 * cos[i] - x1 * sin[i]);
        put(b, x0 * sin[i] + x1 * cos[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(head_dim: usize) -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            hidden_size: head_dim,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim,
            vocab_size: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            rope_interleaved: false,
        }
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() -> Result<()> {
        let dev = Device::Cpu;
        let table = RopeTable::new(&cfg(8), 32, None, DType::F32, &dev)?;
        let x = Tensor::arange(1f32, 17., &dev)?.reshape((2, 1, 8))?;
        let pos = Tensor::new(&[0u32, 5], &dev)?;
        let (cos, sin) = table.gather(&pos)?;
        let y = RopeTable::apply(&x, &cos, &sin, false)?;
        let x0: Vec<f32> = x.get(0)?.flatten_all()?.to_vec1()?;
        let y0: Vec<f32> = y.get(0)?.flatten_all()?.to_vec1()?;
        assert_eq!(x0, y0);
        let nx: f32 = x.get(1)?.sqr()?.sum_all()?.to_scalar()?;
        let ny: f32 = y.get(1)?.sqr()?.sum_all()?.to_scalar()?;
        assert!((nx - ny).abs() < 1e-3);
        Ok(())
    }

    #[test]
    fn same_position_gives_same_rotation_in_any_row() -> Result<()> {
        let dev = Device::Cpu;
        let table = RopeTable::new(&cfg(8), 32, None, DType::F32, &dev)?;
        let row = Tensor::arange(0f32, 8., &dev)?.reshape((1, 1, 8))?;
        let x = Tensor::cat(&[&row, &row, &row], 0)?;
        let (cos, sin) = table.gather(&Tensor::new(&[7u32, 3, 7], &dev)?)?;
        let y = RopeTable::apply(&x, &cos, &sin, false)?;
        let a: Vec<f32> = y.get(0)?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = y.get(2)?.flatten_all()?.to_vec1()?;
        let c: Vec<f32> = y.get(1)?.flatten_all()?.to_vec1()?;
        assert_eq!(a, b);
        assert_ne!(a, c);
        Ok(())
    }

    #[test]
    fn interleaved_layout_equals_rotate_half_on_permuted_dims() -> Result<()> {
        // Interleaved pair (2i, 2i+1) is rotate-half pair (i, i + d/2).
        let dev = Device::Cpu;
        let table = RopeTable::new(&cfg(8), 32, None, DType::F32, &dev)?;
        let x = Tensor::arange(1f32, 17., &dev)?.reshape((2, 1, 8))?;
        let (cos, sin) = table.gather(&Tensor::new(&[3u32, 9], &dev)?)?;
        let perm = Tensor::new(&[0u32, 4, 1, 5, 2, 6, 3, 7], &dev)?;
        let interleaved = RopeTable::apply(&x.index_select(&perm, 2)?, &cos, &sin, true)?;
        let half = RopeTable::apply(&x, &cos, &sin, false)?.index_select(&perm, 2)?;
        let diff: f32 = (interleaved - half)?.abs()?.max_all()?.to_scalar()?;
        assert!(diff < 1e-5);
        Ok(())
    }

    #[test]
    fn rotating_a_head_gives_the_bits_candle_gives() -> Result<()> {
        let dev = Device::Cpu;
        let (t, heads, dim) = (5, 3, 16);
        let table = RopeTable::new(&cfg(dim), 64, None, DType::F32, &dev)?;
        let x = Tensor::randn(0f32, 3.0, (t, heads, dim), &dev)?;
        let (cos, sin) = table.gather(&Tensor::new(&[0u32, 1, 17, 40, 63], &dev)?)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let (c, s): (Vec<f32>, Vec<f32>) = (cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?);
        for interleaved in [false, true] {
            let want: Vec<f32> = RopeTable::apply(&x, &cos, &sin, interleaved)?.flatten_all()?.to_vec1()?;
            let mut got = vec![f32::NAN; xs.len()];
            for (r, (src, dst)) in xs.chunks(dim).zip(got.chunks_mut(dim)).enumerate() {
                let tok = r / heads;
                let rows = tok * dim / 2..(tok + 1) * dim / 2;
                rotate_head(src, &c[rows.clone()], &s[rows], interleaved, |i, v| dst[i] = v);
            }
            let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "interleaved = {interleaved}: {want:?} != {got:?}");
        }
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_slows_low_ones() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(llama3_scale(1.0, &s), 1.0);
        let low = 2.0 * std::f32::consts::PI / 100_000.0;
        assert!((llama3_scale(low, &s) - low / 8.0).abs() < 1e-12);
    }
}
