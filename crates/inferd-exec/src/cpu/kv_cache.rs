//! The CPU KV cache: per layer, K and V of shape
//! `[num_blocks, block_size, kv_heads, head_dim]`, in f32 or f16.

use half::f16;

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Full precision; fastest on CPU.
    #[default]
    F32,
    /// Half the memory, converted on every read.
    F16,
}

impl KvDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" | "half" => Ok(KvDtype::F16),
            other => Err(format!("unknown KV cache dtype {other:?} (expected f32 or f16)")),
        }
    }
}

/// A KV cache element.
pub(crate) trait KvElem: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElem for f16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// One layer's keys and values.
#[derive(Debug)]
pub(crate) struct LayerKv<T> {
    pub(crate) k: Vec<T>,
    pub(crate) v: Vec<T>,
}

impl<T: KvElem> LayerKv<T> {
    fn new(elems: usize) -> Self {
        LayerKv { k: vec![T::default(); elems], v: vec![T::default(); elems] }
    }

    /// Writes token rows of `k` and `v` (each `row` values) into their slots.
    pub(crate) fn write(&mut self, k: &[f32], v: &[f32], slots: &[u32], row: usize) {
        for (t, &slot) in slots.iter().enumerate() {
            let dst = slot as usize * row..(slot as usize + 1) * row;
            let src = t * row..(t + 1) * row;
            for (d, s) in self.k[dst.clone()].iter_mut().zip(&k[src.clone()]) {
                *d = T::from_f32(*s);
            }
            for (d, s) in self.v[dst].iter_mut().zip(&v[src]) {
                *d = T::from_f32(*s);
            }
        }
    }
}

/// Every layer's cache, in one element type.
#[derive(Debug)]
pub(crate) enum KvCache {
    F32(Vec<LayerKv<f32>>),
    F16(Vec<LayerKv<f16>>),
}

impl KvCache {
    pub(crate) fn new(dtype: KvDtype, layers: usize, elems_per_layer: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvCache::F32((0..layers).map(|_| LayerKv::new(elems_per_layer)).collect()),
            KvDtype::F16 => KvCache::F16((0..layers).map(|_| LayerKv::new(elems_per_layer)).collect()),
        }
    }
}

/// Bytes one block takes across all layers, K and V.
pub fn block_bytes(
    layers: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: KvDtype,
) -> usize {
    layers * 2 * block_size * kv_heads * head_dim * dtype.size_in_bytes()
}
