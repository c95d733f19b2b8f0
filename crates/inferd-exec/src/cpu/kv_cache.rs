//! The CPU KV cache: per layer, K and V of shape
//! `[num_blocks, block_size, kv_heads, head_dim]`, in f32 (fastest on the
//! CPU), or f16 or bf16 (half the memory, converted on every read).

use half::{bf16, f16};
use inferd_contract::DType;

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

impl KvElem for bf16 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
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
    BF16(Vec<LayerKv<bf16>>),
}

impl KvCache {
    pub(crate) fn new(dtype: DType, layers: usize, elems_per_layer: usize) -> Self {
        fn layers_of<T: KvElem>(layers: usize, elems: usize) -> Vec<LayerKv<T>> {
            (0..layers).map(|_| LayerKv::new(elems)).collect()
        }
        match dtype {
            DType::F32 => KvCache::F32(layers_of(layers, elems_per_layer)),
            DType::F16 => KvCache::F16(layers_of(layers, elems_per_layer)),
            DType::BF16 => KvCache::BF16(layers_of(layers, elems_per_layer)),
        }
    }
}

/// Bytes one block takes across all layers, K and V.
pub fn block_bytes(
    layers: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
) -> usize {
    layers * 2 * block_size * kv_heads * head_dim * dtype.size_in_bytes()
}
