//! Paged attention on AVX-512 for the common shapes (head size 32, 64 or
//! 128; up to 8 query heads per kv head): the group's queries and running
//! outputs stay in registers, each key and value row is loaded once for
//! all of the group's heads, and the softmax of 16 keys at a time runs as
//! vector operations (`vscalefps` for the power of two of `e^x`).

use std::any::TypeId;
use std::arch::x86_64::*;

use half::{bf16, f16};

use super::attention::{EXP_MIN, EXP_POLY, KvSpan, LN2_HI, LN2_LO, MAX_BLOCK_SIZE};
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

/// `e^x` of 16 lanes of `x <= 0`, as `attention::exp_nonpositive`.
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
