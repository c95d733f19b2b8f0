//! Paged attention on the CPU. One kernel serves prefill, chunked prefill
//! and decode in a mixed batch: every query token attends to its own
//! sequence's keys at positions up to its own, read through the sequence's
//! block table. Work is split over (run of a sequence's tokens, kv head)
//! pairs: a run is one token, or on AVX2 up to [`MAX_ROWS`] query rows'
//! worth of a prompt's consecutive tokens, whose heads share each key and
//! value as it is loaded. Keys are consumed a block at a time with an
//! online softmax, so no score buffer grows with the context.

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
                let correction = inferd_cpu::exp(max[h] - new_max);
                denom[h] *= correction;
                out[h * d..(h + 1) * d].iter_mut().for_each(|o| *o *= correction);
                max[h] = new_max;
            }
            let m = max[h];
            sc.iter_mut().for_each(|v| *v = inferd_cpu::exp(*v - m));
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
                Isa::Avx2 if super::attention_x86::handles_rows(q.len() / d, d) => unsafe {
                    super::attention_x86::attend_rows_avx2(
                        q,
                        &[span.ctx; MAX_GROUP][..q.len() / d],
                        out,
                        span,
                    )
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

#[cfg(target_arch = "x86_64")]
use super::attention_x86::MAX_ROWS;

/// Most consecutive tokens of one sequence attended together: as many as
/// fill the AVX2 kernel's rows, one on the other paths (the AVX-512 kernel
/// keeps one token's group in registers).
fn tokens_per_run(group: usize, head_dim: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if inferd_cpu::Isa::detected() == inferd_cpu::Isa::Avx2
        && super::attention_x86::handles_rows(group, head_dim)
    {
        return MAX_ROWS / group;
    }
    let _ = (group, head_dim);
    1
}

/// Token `t`'s query heads for kv head `kvh` (`group` of them, consecutive).
fn heads_of(t: usize, kvh: usize, s: AttnShape) -> std::ops::Range<usize> {
    let width = s.heads / s.kv_heads * s.head_dim;
    let start = t * s.heads * s.head_dim + kvh * width;
    start..start + width
}

/// Attention of tokens `first..first + n` (one sequence's, `n` at most
/// [`tokens_per_run`]) for every kv head into `out` (`n * heads *
/// head_dim`, as the step's output lays them out).
fn attend_run<T: KvElem>(
    kv: &LayerKv<T>,
    q: &[f32],
    input: &ModelInput,
    table: &[u32],
    (first, n): (usize, usize),
    out: &mut [f32],
    s: AttnShape,
) {
    let ctx = |t: usize| input.positions[t] as usize + 1;
    #[cfg(target_arch = "x86_64")]
    {
        // tokens_per_run gives runs of several tokens only where this
        // kernel takes them.
        let group = s.heads / s.kv_heads;
        let width = group * s.head_dim;
        let (mut rows, mut got) = ([0f32; MAX_ROWS * 128], [0f32; MAX_ROWS * 128]);
        let mut row_ctx = [0usize; MAX_ROWS];
        for i in 0..n {
            row_ctx[i * group..(i + 1) * group].fill(ctx(first + i));
        }
        let row_ctx = &row_ctx[..n * group];
        let longest = row_ctx.iter().copied().max().unwrap_or(1);
        let span = |kvh| KvSpan { kv, table, ctx: longest, kvh, s };
        for kvh in 0..s.kv_heads {
            for i in 0..n {
                rows[i * width..(i + 1) * width].copy_from_slice(&q[heads_of(first + i, kvh, s)]);
            }
            // SAFETY: runs of several tokens exist only on the AVX2 path
            // (which the CPU supports) with shapes handles_rows accepts.
            unsafe {
                super::attention_x86::attend_rows_avx2(
                    &rows[..n * width],
                    row_ctx,
                    &mut got[..n * width],
                    span(kvh),
                )
            };
            for i in 0..n {
                out[heads_of(i, kvh, s)].copy_from_slice(&got[i * width..(i + 1) * width]);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kv, q, table, out, ctx);
        unreachable!("runs of {n} tokens without the AVX2 kernel ({s:?})");
    }
}

/// One work item of [`paged_attention`].
#[derive(Clone, Copy)]
enum Work {
    /// Token `t`'s query heads of kv head `kvh`.
    Head { t: usize, kvh: usize },
    /// Tokens `first..first + n` of one sequence, every kv head.
    Run { first: usize, n: usize },
}

/// Attention for every token and kv head of the batch, each over the query
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
    let (width, token_width) = (group * s.head_dim, s.heads * s.head_dim);
    // The work items, each with its own part of the output: a decoding
    // token (or any token off the AVX2 path) for each kv head alone, so
    // even one sequence's attention is spread over the threads; a run of a
    // prompt's consecutive tokens for all kv heads at once.
    let per_run = tokens_per_run(group, s.head_dim);
    let mut items: Vec<(&mut [f32], Work)> = Vec::with_capacity(token_seq.len() * s.kv_heads);
    let (mut rest, mut t) = (out.as_mut_slice(), 0);
    while t < token_seq.len() {
        let n =
            (1..per_run.min(token_seq.len() - t)).take_while(|&i| token_seq[t + i] == token_seq[t]).count()
                + 1;
        let (mine, after) = std::mem::take(&mut rest).split_at_mut(n * token_width);
        if n == 1 {
            items.extend(mine.chunks_mut(width).enumerate().map(|(kvh, o)| (o, Work::Head { t, kvh })));
        } else {
            items.push((mine, Work::Run { first: t, n }));
        }
        (rest, t) = (after, t + n);
    }
    let one = |_: usize, item: &mut [(&mut [f32], Work)]| {
        let (o, work) = &mut item[0];
        match *work {
            Work::Head { t, kvh } => {
                let table = input.block_table(token_seq[t] as usize);
                let span = KvSpan { kv, table, ctx: input.positions[t] as usize + 1, kvh, s };
                attend_group(&q[heads_of(t, kvh, s)], o, span);
            }
            Work::Run { first, n } => {
                let table = input.block_table(token_seq[first] as usize);
                attend_run(kv, q, input, table, (first, n), o, s);
            }
        }
    };
    // Tiny steps (a few decode rows of short context) run on this thread:
    // waking the compute threads costs more than the work. Larger ones run on the same
    // threads as the matmuls, so no second pool competes for the cores.
    let work: usize = input.positions.iter().map(|&p| p as usize + 1).sum::<usize>() * s.heads;
    if work < PARALLEL_MIN_WORK {
        items.chunks_mut(1).enumerate().for_each(|(i, item)| one(i, item));
    } else {
        inferd_cpu::Pool::global().for_each_chunk(&mut items, 1, 1, one);
    }
    drop(items);
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
    fn a_mixed_batch_gives_every_token_the_attention_it_gets_alone() {
        // Decode tokens and prompt chunks side by side: runs of a prompt's
        // tokens (on AVX2) must give each token exactly its own result.
        let (bs, d, kv_heads, heads) = (16usize, 64usize, 2usize, 6usize);
        let s = AttnShape { heads, kv_heads, head_dim: d, block_size: bs, scale: 0.125 };
        let row = kv_heads * d;
        let val = |i: usize, j: usize| ((i * 131 + j * 71) % 97) as f32 / 48.5 - 1.0;
        let mut kv = LayerKv::<f32> { k: vec![0.0; 12 * bs * row], v: vec![0.0; 12 * bs * row] };
        let all: Vec<u32> = (0..12 * bs as u32).collect();
        let keys: Vec<f32> = (0..all.len() * row).map(|i| val(i, 1)).collect();
        let values: Vec<f32> = (0..all.len() * row).map(|i| val(i, 5)).collect();
        kv.write(&keys, &values, &all, row);
        // (first position, tokens, blocks) of each sequence.
        let small: &[(usize, usize, &[u32])] = &[(20, 1, &[3, 1]), (5, 9, &[0]), (0, 2, &[7])];
        let large: &[(usize, usize, &[u32])] =
            &[(20, 1, &[3, 1]), (10, 41, &[0, 2, 9, 4]), (30, 1, &[5, 6]), (0, 7, &[7]), (3, 2, &[8])];
        for seqs in [small, large] {
            let mut input = ModelInput::new(4);
            let mut token_seq = Vec::new();
            for (i, &(start, n, blocks)) in seqs.iter().enumerate() {
                input.push_seq(inferd_core::RequestId(i as u64 + 1), &vec![1; n], start, blocks, bs, true);
                token_seq.extend(std::iter::repeat_n(i as u32, n));
            }
            let q: Vec<f32> = (0..token_seq.len() * heads * d).map(|i| val(i, 9) * 2.0).collect();
            let got = paged_attention(&kv, &q, &input, &token_seq, s);
            let width = heads / kv_heads * d;
            for (t, &seq) in token_seq.iter().enumerate() {
                for kvh in 0..kv_heads {
                    let ctx = input.positions[t] as usize + 1;
                    let span = KvSpan { kv: &kv, table: input.block_table(seq as usize), ctx, kvh, s };
                    let mut want = vec![0f32; width];
                    attend_group(&q[heads_of(t, kvh, s)], &mut want, span);
                    assert_eq!(&got[heads_of(t, kvh, s)], want.as_slice(), "token {t} kv head {kvh}");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_x86_kernels_equal_the_portable_one_for_every_shape_they_take() {
        use super::super::attention_x86::{MAX_ROWS, attend, attend_rows_avx2, handles, handles_rows};
        use half::{bf16, f16};
        use inferd_cpu::Isa;
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        // `tokens` consecutive tokens of one sequence, `g` heads each, the
        // last seeing `ctx` keys.
        fn check<T: KvElem>(avx512: bool, g: usize, tokens: usize, d: usize, bs: usize, ctx: usize) {
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
            let width = g * d;
            let q: Vec<f32> = (0..tokens * width).map(|i| val(i, 9) * 3.0).collect();
            let token_ctx = |i: usize| ctx + 1 - tokens + i;
            let span = |c: usize| KvSpan { kv: &kv, table: &table, ctx: c, kvh: 1, s: shape };
            let what = format!("g {g} tokens {tokens} d {d} bs {bs} ctx {ctx}");
            let mut slow = vec![0f32; tokens * width];
            for (i, o) in slow.chunks_mut(width).enumerate() {
                attend_group_body(&q[i * width..(i + 1) * width], o, span(token_ctx(i)));
            }
            let close = |name: &str, fast: &[f32]| {
                for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                    assert!((a - b).abs() < 2e-5, "{name}: {what} [{i}]: {a} vs {b}");
                }
            };
            if avx512 && tokens == 1 && handles(g, d) {
                let mut fast = vec![0f32; width];
                // SAFETY: AVX-512F was detected and the shape is one it takes.
                unsafe { attend(&q, &mut fast, span(ctx)) };
                close("avx512", &fast);
            }
            if Isa::Avx2.supported() && handles_rows(tokens * g, d) {
                let row_ctx: Vec<usize> = (0..tokens * g).map(|r| token_ctx(r / g)).collect();
                let mut fast = vec![0f32; tokens * width];
                // SAFETY: AVX2, FMA and F16C were detected and the shape is one it takes.
                unsafe { attend_rows_avx2(&q, &row_ctx, &mut fast, span(ctx)) };
                close("avx2", &fast);
                // Each token's rows come out as they do attended alone: a
                // token's numbers do not depend on its neighbours in a run.
                for (i, o) in fast.chunks(width).enumerate() {
                    let mut alone = vec![0f32; width];
                    let one = vec![token_ctx(i); g];
                    // SAFETY: as above.
                    unsafe {
                        attend_rows_avx2(&q[i * width..(i + 1) * width], &one, &mut alone, span(token_ctx(i)))
                    };
                    assert_eq!(o, alone.as_slice(), "avx2 token {i} of a run, {what}");
                }
            }
        }
        for g in 1..=8 {
            for tokens in 1..=MAX_ROWS / g {
                for d in [32, 64, 128] {
                    for (bs, ctx) in [(16, 12), (16, 37), (32, 70), (8, 20), (4, 9)] {
                        if tokens > ctx {
                            continue;
                        }
                        check::<f32>(avx512, g, tokens, d, bs, ctx);
                        check::<f16>(avx512, g, tokens, d, bs, ctx);
                        check::<bf16>(avx512, g, tokens, d, bs, ctx);
                    }
                }
            }
            check::<f32>(avx512, g, 1, 64, 16, 1);
        }
    }
}
