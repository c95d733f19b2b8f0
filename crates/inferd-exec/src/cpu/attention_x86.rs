//! Paged attention on AVX-512 and on AVX2 for the common shapes (head size
//! 32, 64 or 128; on AVX-512 up to 8 query heads per kv head, on AVX2 up to
//! 12 query rows: the heads of one token or of several of a sequence's
//! tokens). On AVX-512 the group's queries and running outputs stay in
//! registers; on both, each key and value row is loaded once for all of the
//! rows, and the softmax of 16 (AVX2: 8) keys at a time runs as vector
//! operations.

use std::any::TypeId;
use std::arch::x86_64::*;

use half::{bf16, f16};

use inferd_cpu::math::{EXP_MIN, EXP_POLY, LN2_HI, LN2_LO};

use super::attention::{KvSpan, MAX_BLOCK_SIZE};
use super::kv_cache::KvElem;

/// Whether [`attend`] takes a group of `g` heads of size `head_dim`.
pub(crate) fn handles(g: usize, head_dim: usize) -> bool {
    (1..=8).contains(&g) && matches!(head_dim, 32 | 64 | 128)
}

/// As `attention::attend_group_body`, for shapes [`handles`] accepts.
///
/// # Safety
/// The CPU must support AVX-512F; `handles(q.len() / head_dim, head_dim)`.
pub(crate) unsafe fn attend<T: KvElem>(q: &[f32], out: &mut [f32], span: KvSpan<'_, T>) {
    macro_rules! go {
        ($($g:literal)*) => {
            match (q.len() / span.s.head_dim, span.s.head_dim / 16) {
                $(
                    ($g, 2) => unsafe { group::<T, $g, 2>(q, out, span) },
                    ($g, 4) => unsafe { group::<T, $g, 4>(q, out, span) },
                    ($g, 8) => unsafe { group::<T, $g, 8>(q, out, span) },
                )*
                other => unreachable!("unsupported attention shape {other:?}"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

/// 16 cache elements as f32.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16<T: KvElem>(p: *const T) -> __m512 {
    // SAFETY: the caller reads 16 elements at `p`; the type test folds away.
    unsafe {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            _mm512_loadu_ps(p.cast())
        } else if TypeId::of::<T>() == TypeId::of::<f16>() {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        } else {
            debug_assert!(TypeId::of::<T>() == TypeId::of::<bf16>());
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())), 16))
        }
    }
}

/// `e^x` of 16 lanes of `x <= 0`, as `inferd_cpu::exp` (with fused multiply-adds).
#[target_feature(enable = "avx512f")]
#[inline]
fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

// The loops index [head][key] and [head][chunk] arrays by both at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn group<T: KvElem, const G: usize, const D16: usize>(
    q: &[f32],
    out: &mut [f32],
    span: KvSpan<'_, T>,
) {
    let KvSpan { kv, table, ctx, kvh, s } = span;
    let d = D16 * 16;
    let row = s.kv_heads * d;
    debug_assert!(q.len() == G * d && out.len() == G * d && s.block_size <= MAX_BLOCK_SIZE);
    let mut qv = [[_mm512_setzero_ps(); D16]; G];
    for (h, qh) in qv.iter_mut().enumerate() {
        for (c, v) in qh.iter_mut().enumerate() {
            // SAFETY: q holds G * d floats.
            *v = _mm512_mul_ps(
                unsafe { _mm512_loadu_ps(q.as_ptr().add(h * d + c * 16)) },
                _mm512_set1_ps(s.scale),
            );
        }
    }
    let mut acc = [[_mm512_setzero_ps(); D16]; G];
    let mut max = [f32::NEG_INFINITY; G];
    let mut denom = [0f32; G];
    let mut p = [[0f32; 16]; G];
    let (keys, values) = (kv.k.as_ptr(), kv.v.as_ptr());
    for (bi, &block) in table.iter().enumerate().take(ctx.div_ceil(s.block_size)) {
        let n = s.block_size.min(ctx - bi * s.block_size);
        let base = block as usize * s.block_size;
        assert!((base + n) * row <= kv.k.len(), "block {block} is outside the cache");
        for j0 in (0..n).step_by(16) {
            let m = (n - j0).min(16);
            for j in 0..m {
                // SAFETY: slot base+j0+j is inside the cache (asserted above).
                let kp = unsafe { keys.add((base + j0 + j) * row + kvh * d) };
                // SAFETY: a key row holds d = 16 * D16 elements.
                let kr: [__m512; D16] = std::array::from_fn(|c| unsafe { load16(kp.add(c * 16)) });
                for h in 0..G {
                    let mut sv = _mm512_mul_ps(qv[h][0], kr[0]);
                    for c in 1..D16 {
                        sv = _mm512_fmadd_ps(qv[h][c], kr[c], sv);
                    }
                    p[h][j] = _mm512_reduce_add_ps(sv);
                }
            }
            let live: __mmask16 = if m == 16 { !0 } else { (1u16 << m) - 1 };
            for h in 0..G {
                // SAFETY: p[h] holds 16 floats.
                let sv =
                    unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), live, p[h].as_ptr()) };
                let bmax = _mm512_reduce_max_ps(sv);
                if bmax > max[h] {
                    let corr = _mm512_cvtss_f32(exp16(_mm512_set1_ps(max[h] - bmax)));
                    denom[h] *= corr;
                    for a in acc[h].iter_mut() {
                        *a = _mm512_mul_ps(*a, _mm512_set1_ps(corr));
                    }
                    max[h] = bmax;
                }
                let e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(max[h]))));
                denom[h] += _mm512_reduce_add_ps(e);
                // SAFETY: p[h] holds 16 floats.
                unsafe { _mm512_storeu_ps(p[h].as_mut_ptr(), e) };
            }
            for j in 0..m {
                // SAFETY: as for the keys.
                let vp = unsafe { values.add((base + j0 + j) * row + kvh * d) };
                // SAFETY: a value row holds d elements.
                let vr: [__m512; D16] = std::array::from_fn(|c| unsafe { load16(vp.add(c * 16)) });
                for h in 0..G {
                    let w = _mm512_set1_ps(p[h][j]);
                    for c in 0..D16 {
                        acc[h][c] = _mm512_fmadd_ps(w, vr[c], acc[h][c]);
                    }
                }
            }
        }
    }
    for h in 0..G {
        let inv = _mm512_set1_ps(1.0 / denom[h]);
        for c in 0..D16 {
            // SAFETY: out holds G * d floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(h * d + c * 16), _mm512_mul_ps(acc[h][c], inv)) };
        }
    }
}

/// Most query rows the AVX2 kernel attends together: a run of a
/// sequence's tokens times the query heads of one kv head.
pub(crate) const MAX_ROWS: usize = 12;

/// Whether [`attend_rows_avx2`] takes `rows` query rows of size `head_dim`.
pub(crate) fn handles_rows(rows: usize, head_dim: usize) -> bool {
    (1..=MAX_ROWS).contains(&rows) && matches!(head_dim, 32 | 64 | 128)
}

/// As `attention::attend_group_body` on AVX2, for rows of one sequence
/// that may see different numbers of keys: row `r` of `q` attends to the
/// first `row_ctx[r]` keys (`1..=span.ctx`) of kv head `span.kvh`, so the
/// heads of several of a prompt's tokens are attended in one pass and each
/// key and value row is loaded once for all of them (once per token was
/// most of the time a long prefill spent in attention: the keys streamed
/// from L2 and L3 for every token). Sixteen vector registers cannot hold
/// the rows' queries and outputs as the AVX-512 kernel does, so the outputs
/// are updated a pair of vectors for up to four rows at a time over each
/// run of 8 keys; scores come 8 keys at a time, their dot products reduced
/// together, and the softmax runs on those 8 lanes.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `handles_rows(row_ctx.len(),
/// head_dim)`.
pub(crate) unsafe fn attend_rows_avx2<T: KvElem>(
    q: &[f32],
    row_ctx: &[usize],
    out: &mut [f32],
    span: KvSpan<'_, T>,
) {
    match span.s.head_dim / 8 {
        4 => unsafe { rows_avx2::<T, 4>(q, row_ctx, out, span) },
        8 => unsafe { rows_avx2::<T, 8>(q, row_ctx, out, span) },
        16 => unsafe { rows_avx2::<T, 16>(q, row_ctx, out, span) },
        other => unreachable!("unsupported head size {}", other * 8),
    }
}

/// 8 cache elements as f32.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn load8<T: KvElem>(p: *const T) -> __m256 {
    // SAFETY: the caller reads 8 elements at `p`; the type test folds away.
    unsafe {
        if TypeId::of::<T>() == TypeId::of::<f32>() {
            _mm256_loadu_ps(p.cast())
        } else if TypeId::of::<T>() == TypeId::of::<f16>() {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        } else {
            debug_assert!(TypeId::of::<T>() == TypeId::of::<bf16>());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()))))
        }
    }
}

/// `e^x` of 8 lanes of `x <= 0`, as `inferd_cpu::exp` (with fused multiply-adds).
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // 2^n built in the exponent field: n >= -126 after the clamp.
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
}

/// Lane `j` of the result: the sum of the eight lanes of `v[j]`.
#[target_feature(enable = "avx2")]
#[inline]
fn reduce8(v: &[__m256; 8]) -> __m256 {
    let u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    let u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    // Each 128-bit half holds a partial sum of each of four vectors.
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
}

/// The largest and the sum of 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn hmax_hsum(m: __m256, s: __m256) -> (f32, f32) {
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    (
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m))),
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s))),
    )
}

// The loops index [row][key] and [row][chunk] arrays by both at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<T: KvElem, const D8: usize>(
    q: &[f32],
    row_ctx: &[usize],
    out: &mut [f32],
    span: KvSpan<'_, T>,
) {
    let KvSpan { kv, table, ctx, kvh, s } = span;
    let (d, rows) = (D8 * 8, row_ctx.len());
    let row = s.kv_heads * d;
    debug_assert!(rows <= MAX_ROWS && q.len() == rows * d && out.len() == rows * d);
    debug_assert!(s.block_size <= MAX_BLOCK_SIZE && row_ctx.iter().all(|&c| (1..=ctx).contains(&c)));
    let mut qv = [[_mm256_setzero_ps(); D8]; MAX_ROWS];
    for (r, qr) in qv.iter_mut().enumerate().take(rows) {
        for (c, v) in qr.iter_mut().enumerate() {
            // SAFETY: q holds rows * d floats.
            *v = _mm256_mul_ps(
                unsafe { _mm256_loadu_ps(q.as_ptr().add(r * d + c * 8)) },
                _mm256_set1_ps(s.scale),
            );
        }
    }
    let mut acc = [[_mm256_setzero_ps(); D8]; MAX_ROWS];
    let mut max = [f32::NEG_INFINITY; MAX_ROWS];
    let mut denom = [0f32; MAX_ROWS];
    let mut p = [[0f32; 8]; MAX_ROWS];
    let mut dots = [[_mm256_setzero_ps(); 8]; MAX_ROWS];
    let (keys, values) = (kv.k.as_ptr(), kv.v.as_ptr());
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (bi, &block) in table.iter().enumerate().take(ctx.div_ceil(s.block_size)) {
        let n = s.block_size.min(ctx - bi * s.block_size);
        let base = block as usize * s.block_size;
        assert!((base + n) * row <= kv.k.len(), "block {block} is outside the cache");
        for j0 in (0..n).step_by(8) {
            let m = (n - j0).min(8);
            for j in 0..m {
                // SAFETY: slot base+j0+j is inside the cache (asserted above).
                let kp = unsafe { keys.add((base + j0 + j) * row + kvh * d) };
                // SAFETY: a key row holds d = 8 * D8 elements.
                let kr: [__m256; D8] = std::array::from_fn(|c| unsafe { load8(kp.add(c * 8)) });
                for r in 0..rows {
                    let mut sv = _mm256_mul_ps(qv[r][0], kr[0]);
                    for c in 1..D8 {
                        sv = _mm256_fmadd_ps(qv[r][c], kr[c], sv);
                    }
                    dots[r][j] = sv;
                }
            }
            // Keys of this run before each row's end.
            let first = bi * s.block_size + j0;
            for r in 0..rows {
                let seen = row_ctx[r].saturating_sub(first).min(m);
                if seen == 0 {
                    p[r] = [0.0; 8];
                    continue;
                }
                let live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(seen as i32), lane));
                let sv = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), reduce8(&dots[r]), live);
                let (bmax, _) = hmax_hsum(sv, sv);
                if bmax > max[r] {
                    let corr = _mm256_cvtss_f32(exp8(_mm256_set1_ps(max[r] - bmax)));
                    denom[r] *= corr;
                    for a in acc[r].iter_mut() {
                        *a = _mm256_mul_ps(*a, _mm256_set1_ps(corr));
                    }
                    max[r] = bmax;
                }
                let e = _mm256_and_ps(live, exp8(_mm256_sub_ps(sv, _mm256_set1_ps(max[r]))));
                denom[r] += hmax_hsum(e, e).1;
                // SAFETY: p[r] holds 8 floats.
                unsafe { _mm256_storeu_ps(p[r].as_mut_ptr(), e) };
            }
            // SAFETY: as for the keys.
            let vals = unsafe { values.add((base + j0) * row + kvh * d) };
            for r0 in (0..rows).step_by(4) {
                let (acc, p) = (&mut acc[r0..rows], &p[r0..rows]);
                // SAFETY: m value rows of d elements, `row` apart, start at vals.
                unsafe {
                    match rows - r0 {
                        1 => add_values::<T, D8, 1>(acc, p, vals, row, m),
                        2 => add_values::<T, D8, 2>(acc, p, vals, row, m),
                        3 => add_values::<T, D8, 3>(acc, p, vals, row, m),
                        _ => add_values::<T, D8, 4>(acc, p, vals, row, m),
                    }
                }
            }
        }
    }
    for r in 0..rows {
        let inv = _mm256_set1_ps(1.0 / denom[r]);
        for c in 0..D8 {
            // SAFETY: out holds rows * d floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * d + c * 8), _mm256_mul_ps(acc[r][c], inv)) };
        }
    }
}

/// Adds `p[r][j]` times value row `j` (of `m`, `row` elements apart from
/// `vals`) into `acc[r]` for the first `G` rows: two vectors of each row's
/// output stay in registers over the run of keys.
///
/// # Safety
/// `m` value rows of `8 * D8` elements, `row` apart, start at `vals`;
/// `acc` and `p` hold at least `G` rows.
// The loops index [row][chunk] arrays by both at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn add_values<T: KvElem, const D8: usize, const G: usize>(
    acc: &mut [[__m256; D8]],
    p: &[[f32; 8]],
    vals: *const T,
    row: usize,
    m: usize,
) {
    for c0 in (0..D8).step_by(2) {
        let mut a: [[__m256; 2]; G] = std::array::from_fn(|h| [acc[h][c0], acc[h][c0 + 1]]);
        for j in 0..m {
            // SAFETY: value row j holds 8 * D8 elements (the caller's promise).
            let vp = unsafe { vals.add(j * row + c0 * 8) };
            let vr = unsafe { [load8(vp), load8(vp.add(8))] };
            for h in 0..G {
                let w = _mm256_set1_ps(p[h][j]);
                a[h][0] = _mm256_fmadd_ps(w, vr[0], a[h][0]);
                a[h][1] = _mm256_fmadd_ps(w, vr[1], a[h][1]);
            }
        }
        for h in 0..G {
            acc[h][c0] = a[h][0];
            acc[h][c0 + 1] = a[h][1];
        }
    }
}
