//! Paged attention on the CPU. One kernel serves prefill, chunked prefill
//! and decode in a mixed batch: every query token attends to its own
//! sequence's keys at positions up to its own, read through the sequence's
//! block table. Work is split over (token, head) pairs; keys are consumed a
//! block at a time with an online softmax, so no score buffer grows with
//! the context.

use rayon::prelude::*;

use super::kv_cache::{KvElem, LayerKv};
use inferd_contract::ModelInput;

/// Largest supported block size (the per-block score buffer lives on the stack).
pub const MAX_BLOCK_SIZE: usize = 128;
const LANES: usize = 16;
/// Query-key pairs (over all heads) below which a step's attention runs on
/// the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub scale: f32,
}

#[inline(always)]
fn dot<T: KvElem>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [0f32; LANES];
    let (qc, kc) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i].to_f32();
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in qr.iter().zip(kr) {
        sum += a * b.to_f32();
    }
    sum
}

#[inline(always)]
fn axpy<T: KvElem>(out: &mut [f32], p: f32, v: &[T]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += p * x.to_f32();
    }
}

/// Attention of one query row `q` of kv head `kvh` over `ctx` keys reached
/// through `table`; writes the normalized result to `out`.
fn attend_one<T: KvElem>(
    q: &[f32],
    out: &mut [f32],
    kv: &LayerKv<T>,
    table: &[u32],
    ctx: usize,
    kvh: usize,
    s: AttnShape,
) {
    let row = s.kv_heads * s.head_dim;
    out.fill(0.0);
    let mut max = f32::NEG_INFINITY;
    let mut denom = 0f32;
    let mut scores = [0f32; MAX_BLOCK_SIZE];
    for (bi, &block) in table.iter().enumerate().take(ctx.div_ceil(s.block_size)) {
        let n = s.block_size.min(ctx - bi * s.block_size);
        let base = block as usize * s.block_size;
        let mut block_max = f32::NEG_INFINITY;
        for (j, score) in scores.iter_mut().enumerate().take(n) {
            let off = (base + j) * row + kvh * s.head_dim;
            *score = dot(q, &kv.k[off..off + s.head_dim]) * s.scale;
            block_max = block_max.max(*score);
        }
        let new_max = max.max(block_max);
        if new_max > max {
            let correction = (max - new_max).exp();
            denom *= correction;
            out.iter_mut().for_each(|o| *o *= correction);
            max = new_max;
        }
        for (j, &score) in scores.iter().enumerate().take(n) {
            let p = (score - max).exp();
            denom += p;
            let off = (base + j) * row + kvh * s.head_dim;
            axpy(out, p, &kv.v[off..off + s.head_dim]);
        }
    }
    let inv = 1.0 / denom;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Attention for every (token, head) of the batch. `q` is `(T, heads,
/// head_dim)`; `token_seq[t]` is token `t`'s sequence; returns `(T, heads *
/// head_dim)` flattened.
pub(crate) fn paged_attention<T: KvElem>(
    kv: &LayerKv<T>,
    q: &[f32],
    input: &ModelInput,
    token_seq: &[u32],
    s: AttnShape,
) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    let group = s.heads / s.kv_heads;
    let one = |i: usize, o: &mut [f32], qrow: &[f32]| {
        let (t, h) = (i / s.heads, i % s.heads);
        let seq = token_seq[t] as usize;
        // Causal: a token sees its own position and everything before it.
        let ctx = input.positions[t] as usize + 1;
        attend_one(qrow, o, kv, input.block_table(seq), ctx, h / group, s);
    };
    // Small batches (a few decode rows) run on this thread: waking the rayon
    // pool costs more than the work and competes with candle's spinning pool.
    let work: usize = input.positions.iter().map(|&p| p as usize + 1).sum::<usize>() * s.heads;
    if work < PARALLEL_MIN_WORK {
        out.chunks_mut(s.head_dim)
            .zip(q.chunks(s.head_dim))
            .enumerate()
            .for_each(|(i, (o, qrow))| one(i, o, qrow));
    } else {
        out.par_chunks_mut(s.head_dim)
            .zip(q.par_chunks(s.head_dim))
            .enumerate()
            .for_each(|(i, (o, qrow))| one(i, o, qrow));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention over contiguous keys, for comparison.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let scores: Vec<f32> =
            keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f32 = exps.iter().sum();
        let mut out = vec![0f32; q.len()];
        for (p, v) in exps.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += p / sum * x;
            }
        }
        out
    }

    #[test]
    fn paged_result_equals_contiguous_softmax_attention() {
        let (bs, d, ctx) = (4usize, 8usize, 11usize);
        let shape = AttnShape { heads: 1, kv_heads: 1, head_dim: d, block_size: bs, scale: 0.35 };
        let val = |i: usize, j: usize| ((i * 31 + j * 17) % 13) as f32 / 6.5 - 1.0;
        let keys: Vec<Vec<f32>> = (0..ctx).map(|i| (0..d).map(|j| val(i, j)).collect()).collect();
        let values: Vec<Vec<f32>> = (0..ctx).map(|i| (0..d).map(|j| val(i + 5, j + 3)).collect()).collect();
        // Scatter the keys over non-consecutive blocks 5, 1, 3.
        let table = [5u32, 1, 3];
        let mut kv = LayerKv::<f32> { k: vec![0.0; 8 * bs * d], v: vec![0.0; 8 * bs * d] };
        let slots: Vec<u32> = (0..ctx).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32).collect();
        kv.write(&keys.concat(), &values.concat(), &slots, d);
        let q: Vec<f32> = (0..d).map(|j| val(99, j)).collect();
        let mut out = vec![0f32; d];
        attend_one(&q, &mut out, &kv, &table, ctx, 0, shape);
        let want = reference(&q, &keys, &values, 0.35);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{out:?} vs {want:?}");
        }
    }
}
