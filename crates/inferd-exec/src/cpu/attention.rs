//! Paged attention on the CPU. One kernel serves prefill, chunked prefill
//! and decode in a mixed batch: every query token attends to its own
//! sequence's keys at positions up to its own, read through the sequence's
//! block table. Work is split over (token, head) pairs; keys are consumed a
//! block at a time with an online softmax, so no score buffer grows with
//! the context.

use super::kv_cache::{KvElem, LayerKv};
use inferd_contract::ModelInput;

/// Largest supported block size (the per-block score buffer lives on the stack).
pub const MAX_BLOCK_SIZE: usize = 128;
const LANES: usize = 16;
/// Query-key pairs (over all heads) below which a step's attention runs on
/// the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 11;

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

/// The keys and values one query attends to: the first `ctx` positions of
/// a sequence (reached through its block `table`) in kv head `kvh`.
#[derive(Clone, Copy)]
pub(crate) struct KvSpan<'a, T> {
    pub kv: &'a LayerKv<T>,
    pub table: &'a [u32],
    pub ctx: usize,
    pub kvh: usize,
    pub s: AttnShape,
}

/// Most query heads attended together over one kv head's keys; larger
/// groups are split.
const MAX_GROUP: usize = 16;

/// `e^x` for `x <= 0` (scores minus their running maximum), to about 2e-7
/// relative: `2^n * e^r` with `n` the nearest integer to `x / ln 2` and a
/// degree-6 polynomial for `e^r`, `|r| <= ln 2 / 2`. Plain arithmetic, so
/// a loop of it vectorizes (libm's `expf` does not).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Adding and taking away 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(EXP_MIN);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The exponential's pieces, shared with the AVX-512 kernel: inputs are
/// clamped to `EXP_MIN` (below it `e^x` is under f32's normal range), `ln 2`
/// is split in two so `x - n ln 2` stays exact, and `EXP_POLY` holds the
/// Taylor coefficients of `e^r`, highest degree first.
pub(crate) const EXP_MIN: f32 = -87.0;
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
pub(crate) const EXP_POLY: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// Attention of the `g` query heads in `q` (`g * head_dim`, consecutive
/// heads sharing kv head `kvh`) over `ctx` keys reached through `table`;
/// writes each head's normalized result to `out`. Each key and value is
/// read once for all `g` heads.
// The loops index [head][key] arrays by key and head at once.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn attend_group_body<T: KvElem>(q: &[f32], out: &mut [f32], span: KvSpan<'_, T>) {
    let KvSpan { kv, table, ctx, kvh, s } = span;
    let (d, row) = (s.head_dim, s.kv_heads * s.head_dim);
    let g = q.len() / d;
    debug_assert!(g <= MAX_GROUP && out.len() == q.len());
    out.fill(0.0);
    let mut max = [f32::NEG_INFINITY; MAX_GROUP];
    let mut denom = [0f32; MAX_GROUP];
    let mut scores = [[0f32; MAX_BLOCK_SIZE]; MAX_GROUP];
    for (bi, &block) in table.iter().enumerate().take(ctx.div_ceil(s.block_size)) {
        let n = s.block_size.min(ctx - bi * s.block_size);
        let base = block as usize * s.block_size;
        for j in 0..n {
            let off = (base + j) * row + kvh * d;
            let key = &kv.k[off..off + d];
            for h in 0..g {
                scores[h][j] = dot(&q[h * d..(h + 1) * d], key) * s.scale;
            }
        }
        for h in 0..g {
            let sc = &mut scores[h][..n];
            let new_max = sc.iter().fold(max[h], |m, &v| m.max(v));
            if new_max > max[h] {
                let correction = exp_nonpositive(max[h] - new_max);
                denom[h] *= correction;
                out[h * d..(h + 1) * d].iter_mut().for_each(|o| *o *= correction);
                max[h] = new_max;
            }
            let m = max[h];
            sc.iter_mut().for_each(|v| *v = exp_nonpositive(*v - m));
            denom[h] += sc.iter().sum::<f32>();
        }
        for j in 0..n {
            let off = (base + j) * row + kvh * d;
            let value = &kv.v[off..off + d];
            for h in 0..g {
                axpy(&mut out[h * d..(h + 1) * d], scores[h][j], value);
            }
        }
    }
    for h in 0..g {
        let inv = 1.0 / denom[h];
        out[h * d..(h + 1) * d].iter_mut().for_each(|o| *o *= inv);
    }
}

/// [`attend_group_body`] compiled for AVX-512.
///
/// # Safety
/// The CPU must support AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn attend_group_avx512<T: KvElem>(q: &[f32], out: &mut [f32], span: KvSpan<'_, T>) {
    attend_group_body(q, out, span)
}

/// [`attend_group_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_avx2<T: KvElem>(q: &[f32], out: &mut [f32], span: KvSpan<'_, T>) {
    attend_group_body(q, out, span)
}

/// Attention of a group of query heads sharing kv head `kvh` (see
/// [`attend_group_body`]), compiled for the widest vectors this CPU has.
fn attend_group<T: KvElem>(q: &[f32], out: &mut [f32], span: KvSpan<'_, T>) {
    let d = span.s.head_dim;
    for (q, out) in q.chunks(MAX_GROUP * d).zip(out.chunks_mut(MAX_GROUP * d)) {
        #[cfg(target_arch = "x86_64")]
        {
            use inferd_cpu::Isa;
            match Isa::detected() {
                // SAFETY: the detected path's features include AVX-512F,
                // and the shape was checked.
                Isa::Avx512Vnni if super::attention_x86::handles(q.len() / d, d) => unsafe {
                    super::attention_x86::attend(q, out, span)
                },
                // SAFETY: the detected path's features include these.
                Isa::Avx512Vnni => unsafe { attend_group_avx512(q, out, span) },
                // SAFETY: the detected path's features include AVX2, FMA
                // and F16C, and the shape was checked.
                Isa::Avx2 if super::attention_x86::handles(q.len() / d, d) => unsafe {
                    super::attention_x86::attend_avx2(q, out, span)
                },
                // SAFETY: as above.
                Isa::Avx2 => unsafe { attend_group_avx2(q, out, span) },
                Isa::Scalar => attend_group_body(q, out, span),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        attend_group_body(q, out, span);
    }
}

/// Attention for every (token, kv head) of the batch, each over the query
/// heads that share that kv head. `q` is `(T, heads, head_dim)`;
/// `token_seq[t]` is token `t`'s sequence; returns `(T, heads * head_dim)`
/// flattened.
pub(crate) fn paged_attention<T: KvElem>(
    kv: &LayerKv<T>,
    q: &[f32],
    input: &ModelInput,
    token_seq: &[u32],
    s: AttnShape,
) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    let group = s.heads / s.kv_heads;
    let width = group * s.head_dim;
    let one = |i: usize, o: &mut [f32]| {
        let (t, kvh) = (i / s.kv_heads, i % s.kv_heads);
        let seq = token_seq[t] as usize;
        // Causal: a token sees its own position and everything before it.
        let ctx = input.positions[t] as usize + 1;
        let span = KvSpan { kv, table: input.block_table(seq), ctx, kvh, s };
        attend_group(&q[i * width..(i + 1) * width], o, span);
    };
    // Tiny steps (a few decode rows of short context) run on this thread:
    // waking the compute threads costs more than the work. Larger ones run on the same
    // threads as the matmuls, so no second pool competes for the cores.
    let work: usize = input.positions.iter().map(|&p| p as usize + 1).sum::<usize>() * s.heads;
    if work < PARALLEL_MIN_WORK {
        out.chunks_mut(width).enumerate().for_each(|(i, o)| one(i, o));
    } else {
        inferd_cpu::Pool::global().for_each_chunk(&mut out, width, 1, one);
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
        attend_group(&q, &mut out, KvSpan { kv: &kv, table: &table, ctx, kvh: 0, s: shape });
        let want = reference(&q, &keys, &values, 0.35);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn grouped_heads_each_get_their_own_attention() {
        // 20 query heads over 2 kv heads: groups of 10, and one call with
        // more heads than a group holds, split internally.
        let (bs, d, ctx, kv_heads) = (16usize, 32usize, 40usize, 2usize);
        let val = |i: usize, j: usize| ((i * 131 + j * 71) % 97) as f32 / 48.5 - 1.0;
        let row = kv_heads * d;
        let mut kv = LayerKv::<f32> { k: vec![0.0; 4 * bs * row], v: vec![0.0; 4 * bs * row] };
        let table = [2u32, 0, 3];
        let slots: Vec<u32> = (0..ctx).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32).collect();
        let keys: Vec<f32> = (0..ctx * row).map(|i| val(i, 1)).collect();
        let values: Vec<f32> = (0..ctx * row).map(|i| val(i, 5)).collect();
        kv.write(&keys, &values, &slots, row);
        for (heads, kvh) in [(10usize, 1usize), (20, 0)] {
            let shape = AttnShape { heads: 20, kv_heads, head_dim: d, block_size: bs, scale: 0.2 };
            let q: Vec<f32> = (0..heads * d).map(|i| val(i, 9) * 2.0).collect();
            let mut out = vec![0f32; heads * d];
            attend_group(&q, &mut out, KvSpan { kv: &kv, table: &table, ctx, kvh, s: shape });
            let pick = |src: &[f32], p: usize| src[p * row + kvh * d..p * row + (kvh + 1) * d].to_vec();
            let ks: Vec<Vec<f32>> = (0..ctx).map(|p| pick(&keys, p)).collect();
            let vs: Vec<Vec<f32>> = (0..ctx).map(|p| pick(&values, p)).collect();
            for h in 0..heads {
                let want = reference(&q[h * d..(h + 1) * d], &ks, &vs, 0.2);
                for (a, b) in out[h * d..(h + 1) * d].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "head {h} of {heads}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_x86_kernels_equal_the_portable_one_for_every_shape_they_take() {
        use half::{bf16, f16};
        use inferd_cpu::Isa;
        // Each kernel this CPU runs: AVX-512 where it has it, AVX2 on
        // anything with AVX2, FMA and F16C.
        type Kernel<T> = unsafe fn(&[f32], &mut [f32], KvSpan<'_, T>);
        fn kernels<T: KvElem>() -> Vec<(&'static str, Kernel<T>)> {
            let mut all: Vec<(&'static str, Kernel<T>)> = Vec::new();
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(("avx512", super::super::attention_x86::attend::<T>));
            }
            if Isa::Avx2.supported() {
                all.push(("avx2", super::super::attention_x86::attend_avx2::<T>));
            }
            all
        }
        assert!(!kernels::<f32>().is_empty() || !Isa::Avx2.supported(), "no x86 kernel to test");
        fn check<T: KvElem>(g: usize, d: usize, bs: usize, ctx: usize) {
            let kv_heads = 2;
            let row = kv_heads * d;
            let val = |i: usize, j: usize| ((i * 131 + j * 71) % 97) as f32 / 48.5 - 1.0;
            let blocks = ctx.div_ceil(bs);
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let mut kv = LayerKv::<T> {
                k: vec![T::default(); blocks * bs * row],
                v: vec![T::default(); blocks * bs * row],
            };
            let slots: Vec<u32> = (0..ctx).map(|p| table[p / bs] * bs as u32 + (p % bs) as u32).collect();
            let keys: Vec<f32> = (0..ctx * row).map(|i| val(i, 1)).collect();
            let values: Vec<f32> = (0..ctx * row).map(|i| val(i, 5)).collect();
            kv.write(&keys, &values, &slots, row);
            let shape =
                AttnShape { heads: g * kv_heads, kv_heads, head_dim: d, block_size: bs, scale: 0.125 };
            let q: Vec<f32> = (0..g * d).map(|i| val(i, 9) * 3.0).collect();
            assert!(super::super::attention_x86::handles(g, d));
            let span = KvSpan { kv: &kv, table: &table, ctx, kvh: 1, s: shape };
            let mut slow = vec![0f32; g * d];
            attend_group_body(&q, &mut slow, span);
            for (name, kernel) in kernels::<T>() {
                let mut fast = vec![0f32; g * d];
                // SAFETY: the kernel's features were detected and the shape is one it takes.
                unsafe { kernel(&q, &mut fast, span) };
                for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                    assert!((a - b).abs() < 2e-5, "{name}: g {g} d {d} bs {bs} ctx {ctx} [{i}]: {a} vs {b}");
                }
            }
        }
        for g in 1..=8 {
            for d in [32, 64, 128] {
                for (bs, ctx) in [(16, 1), (16, 37), (32, 70), (8, 20), (4, 9)] {
                    check::<f32>(g, d, bs, ctx);
                    check::<f16>(g, d, bs, ctx);
                    check::<bf16>(g, d, bs, ctx);
                }
            }
        }
    }

    #[test]
    fn the_polynomial_exp_is_within_a_few_ulps() {
        for i in 0..=20_000 {
            let x = -(i as f32) * 0.0044;
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!((got - want).abs() <= 4e-7 * want + 1e-37, "{x}: {got} vs {want}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 1e-37, "underflow goes to about zero");
    }
}
