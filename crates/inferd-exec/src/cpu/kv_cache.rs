//! The CPU KV cache: per layer, K and V of shape
//! `[num_blocks, block_size, kv_heads, head_dim]`, in f32 (fastest on the
//! CPU), or f16 or bf16 (half the memory, converted on every read).

use half::{bf16, f16};
use inferd_contract::DType;
use inferd_models::rope::rotate_head;

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

/// Steps of fewer tokens write their cache on the calling thread.
const PARALLEL_MIN_TOKENS: usize = 8;

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

    /// RoPE and the cache write in one pass over a step's joined projections
    /// (`qkv`: each token's `heads` query heads, then its key heads, then its
    /// value heads, `head_dim` values each): each token's query heads are
    /// rotated into `q`, its key heads rotated into its slot, and its values
    /// copied there. `cos` and `sin` hold each token's `head_dim / 2` rows.
    /// With `order` (the step's [`parallel_slot_order`]) tokens are spread
    /// over the compute threads, each with its own slot's memory; without
    /// it they are written in token order on this thread (a slot named
    /// twice, which the scheduler never sends, keeps the last token's).
    pub(crate) fn write_rotated(
        &mut self,
        qkv: &[f32],
        rope: RopeHost<'_>,
        slots: &[u32],
        order: Option<&[usize]>,
        q: &mut [f32],
    ) {
        let RopeHost { cos, sin, interleaved, heads, head_dim: d } = rope;
        let tokens = slots.len();
        let row = qkv.len() / tokens.max(1);
        let (q_row, kv_row, half) = (heads * d, (row / d - heads) / 2 * d, d / 2);
        let one = |t: usize, q_out: &mut [f32], k_out: &mut [T], v_out: &mut [T]| {
            let (qs, kv) = qkv[t * row..(t + 1) * row].split_at(q_row);
            let (ks, vs) = kv.split_at(kv_row);
            let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            for (x, out) in qs.chunks_exact(d).zip(q_out.chunks_exact_mut(d)) {
                rotate_head(x, c, s, interleaved, |i, v| out[i] = v);
            }
            for (x, out) in ks.chunks_exact(d).zip(k_out.chunks_exact_mut(d)) {
                rotate_head(x, c, s, interleaved, |i, v| out[i] = T::from_f32(v));
            }
            for (o, x) in v_out.iter_mut().zip(vs) {
                *o = T::from_f32(*x);
            }
        };
        let Some(order) = order else {
            for (t, q_out) in q.chunks_exact_mut(q_row).enumerate() {
                let dst = slots[t] as usize * kv_row..(slots[t] as usize + 1) * kv_row;
                one(t, q_out, &mut self.k[dst.clone()], &mut self.v[dst]);
            }
            return;
        };
        let mut q_rows: Vec<Option<&mut [f32]>> = q.chunks_exact_mut(q_row).map(Some).collect();
        let mut items = Vec::with_capacity(tokens);
        let (mut k_rest, mut v_rest, mut at) = (&mut self.k[..], &mut self.v[..], 0);
        for &t in order {
            let skip = slots[t] as usize * kv_row - at;
            let (k_mine, k_after) = std::mem::take(&mut k_rest)[skip..].split_at_mut(kv_row);
            let (v_mine, v_after) = std::mem::take(&mut v_rest)[skip..].split_at_mut(kv_row);
            (k_rest, v_rest, at) = (k_after, v_after, at + skip + kv_row);
            let q_out = q_rows[t].take().expect("one query row per token");
            items.push((t, q_out, k_mine, v_mine));
        }
        let per_call = tokens.div_ceil(4 * inferd_cpu::Pool::global().threads());
        inferd_cpu::Pool::global().for_each_chunk(&mut items, per_call, 1, |_, items| {
            for (t, q_out, k_out, v_out) in items {
                one(*t, q_out, k_out, v_out);
            }
        });
    }
}

/// A step's tokens in the order of their KV slots, when every slot is
/// distinct and there are enough tokens to spread the cache writes over the
/// compute threads: taken once per step, the cache then splits into
/// disjoint pieces for the threads in every layer.
pub(crate) fn parallel_slot_order(slots: &[u32]) -> Option<Vec<usize>> {
    if slots.len() < PARALLEL_MIN_TOKENS {
        return None;
    }
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_unstable_by_key(|&t| slots[t]);
    order.windows(2).all(|w| slots[w[0]] != slots[w[1]]).then_some(order)
}

/// One step's RoPE rows on the host, and the query heads' shape.
#[derive(Clone, Copy)]
pub(crate) struct RopeHost<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub interleaved: bool,
    pub heads: usize,
    pub head_dim: usize,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token's values land in its own slot whether the tokens are
    /// spread over the threads (distinct slots) or written in order on the
    /// caller's (a slot named twice keeps the later token's).
    #[test]
    fn every_token_writes_its_own_slot_and_a_repeated_slot_keeps_the_last() {
        let (heads, kv_heads, d) = (2, 1, 4);
        let row = (heads + 2 * kv_heads) * d;
        let tokens = 12;
        // Position 0 for every token: cos 1, sin 0 leaves values as they are.
        let (cos, sin) = (vec![1f32; tokens * d / 2], vec![0f32; tokens * d / 2]);
        let rope = RopeHost { cos: &cos, sin: &sin, interleaved: false, heads, head_dim: d };
        let qkv: Vec<f32> = (0..tokens * row).map(|i| i as f32).collect();
        let value = |t: usize| qkv[t * row + (heads + kv_heads) * d];
        let key = |t: usize| qkv[t * row + heads * d];
        for slots in [
            (0..tokens as u32).rev().map(|s| s * 3).collect::<Vec<_>>(),
            vec![4, 9, 4, 1, 2, 3, 5, 6, 7, 8, 10, 11],
        ] {
            let mut kv = LayerKv::<f32>::new(40 * kv_heads * d);
            let mut q = vec![f32::NAN; tokens * heads * d];
            kv.write_rotated(&qkv, rope, &slots, parallel_slot_order(&slots).as_deref(), &mut q);
            for (t, &slot) in slots.iter().enumerate() {
                let last = slots.iter().rposition(|&s| s == slot).unwrap();
                let at = slot as usize * kv_heads * d;
                assert_eq!((kv.k[at], kv.v[at]), (key(last), value(last)), "token {t} in slot {slot}");
                assert_eq!(q[t * heads * d..(t + 1) * heads * d], qkv[t * row..t * row + heads * d]);
            }
        }
    }
}
