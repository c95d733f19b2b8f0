//! The x86-64 kernels: AVX-512 VNNI and AVX2. Each computes exactly what
//! `scalar` does: the same integer sums, then per block one multiply of the
//! two scales and one fused multiply-add into the row's accumulator.

use std::arch::x86_64::*;

use crate::q8::{LINES, Line, QK, QuantizedRows, TILE, TileJob};

/// Rows of input the one-tile AVX-512 kernel takes per pass over a tile.
const MR: usize = 8;
/// Rows of input the two-tile AVX-512 kernel takes per pass.
const MR2: usize = 4;

/// A job's tile, or pair of tiles, times every row of its input on AVX-512
/// VNNI. Pairs are the fast case: each activation broadcast then feeds two
/// dot products and each weight line four, which keeps the loads below the
/// two multiply-add ports' pace; one tile at a time, the loads were the
/// limit.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI; the job's
/// output bounds hold (see [`TileJob`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn tiles_avx512(job: TileJob<'_>) {
    let (lines, scales) = job.view.tile(job.t);
    let second = job.pair.then(|| job.view.tile(job.t + 1));
    let (m, ldo) = (job.rows.m, job.ldo);
    let mut r = 0;
    while r < m {
        let n = (m - r).min(if job.pair { MR2 } else { MR });
        let out = job.out.wrapping_add(r * ldo);
        let cols = if job.pair { TILE } else { job.cols };
        let a = Args { lines, scales, nb: job.view.nb, rows: job.rows, r0: r, out, ldo, cols };
        // SAFETY: the caller's guarantees, for rows r..r+n.
        unsafe {
            match second {
                // Few rows leave the dot products one long dependency
                // chain per row; splitting a block's lines over several
                // accumulators keeps the multiply-add units busy.
                None => match n {
                    1 => rows_avx512::<1, 4>(a),
                    2 => rows_avx512::<2, 2>(a),
                    3 => rows_avx512::<3, 2>(a),
                    4 => rows_avx512::<4, 1>(a),
                    5 => rows_avx512::<5, 1>(a),
                    6 => rows_avx512::<6, 1>(a),
                    7 => rows_avx512::<7, 1>(a),
                    _ => rows_avx512::<8, 1>(a),
                },
                Some((lines, scales)) => {
                    let b = Args { lines, scales, out: out.wrapping_add(TILE), cols: job.cols, ..a };
                    match n {
                        1 => {
                            rows_avx512::<1, 4>(a);
                            rows_avx512::<1, 4>(b);
                        }
                        2 => pair_avx512::<2>(a, b),
                        3 => pair_avx512::<3>(a, b),
                        _ => pair_avx512::<4>(a, b),
                    }
                }
            }
        }
        r += n;
    }
}

#[derive(Clone, Copy)]
struct Args<'a> {
    lines: &'a [Line],
    scales: &'a [f32],
    nb: usize,
    rows: &'a QuantizedRows,
    r0: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
}

/// `R` input rows against two tiles at once.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn pair_avx512<const R: usize>(a: Args<'_>, b: Args<'_>) {
    let (k, nb) = (a.rows.k, a.nb);
    debug_assert!(a.r0 + R <= a.rows.m);
    let q = a.rows.q.as_ptr().wrapping_add(a.r0 * k);
    let d = &a.rows.d[a.r0 * nb..];
    let c = &a.rows.c[a.r0 * nb..];
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for blk in 0..nb {
        let mut sums = [[_mm512_setzero_si512(); 2]; R];
        let (lines_a, lines_b) =
            (&a.lines[blk * LINES..(blk + 1) * LINES], &b.lines[blk * LINES..(blk + 1) * LINES]);
        for (g, (line_a, line_b)) in lines_a.iter().zip(lines_b).enumerate() {
            // SAFETY: a `Line` is 64 bytes, aligned to 64.
            let (wa, wb) = unsafe {
                (_mm512_load_si512(line_a.0.as_ptr().cast()), _mm512_load_si512(line_b.0.as_ptr().cast()))
            };
            for (i, s) in sums.iter_mut().enumerate() {
                // SAFETY: row r0+i < m has k values; blk*32+g*4+4 <= k.
                let x = _mm512_set1_epi32(unsafe {
                    q.add(i * k + blk * QK + g * 4).cast::<i32>().read_unaligned()
                });
                s[0] = _mm512_dpbusd_epi32(s[0], wa, x);
                s[1] = _mm512_dpbusd_epi32(s[1], wb, x);
            }
        }
        // SAFETY: a tile holds TILE scales per block.
        let dw = unsafe {
            [
                _mm512_loadu_ps(a.scales.as_ptr().add(blk * TILE)),
                _mm512_loadu_ps(b.scales.as_ptr().add(blk * TILE)),
            ]
        };
        for (i, s) in sums.iter().enumerate() {
            let cx = _mm512_set1_epi32(c[i * nb + blk]);
            let dx = _mm512_set1_ps(d[i * nb + blk]);
            for h in 0..2 {
                let sum = _mm512_sub_epi32(s[h], cx);
                let dd = _mm512_mul_ps(dw[h], dx);
                acc[i][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), dd, acc[i][h]);
            }
        }
    }
    let mask_b: __mmask16 = if b.cols >= TILE { !0 } else { (1u16 << b.cols) - 1 };
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: the caller's bound on `out`; tile `t` is full, the mask
        // keeps tile `t + 1` to its columns.
        unsafe {
            _mm512_storeu_ps(a.out.add(i * a.ldo), v[0]);
            _mm512_mask_storeu_ps(b.out.add(i * b.ldo), mask_b, v[1]);
        }
    }
}

/// `R` input rows against one tile, with `C` accumulators per row.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn rows_avx512<const R: usize, const C: usize>(a: Args<'_>) {
    let (k, nb) = (a.rows.k, a.nb);
    debug_assert!(a.r0 + R <= a.rows.m);
    let q = a.rows.q.as_ptr().wrapping_add(a.r0 * k);
    let d = &a.rows.d[a.r0 * nb..];
    let c = &a.rows.c[a.r0 * nb..];
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let mut sums = [[_mm512_setzero_si512(); C]; R];
        let lines = &a.lines[b * LINES..(b + 1) * LINES];
        for (g, line) in lines.iter().enumerate() {
            // SAFETY: a `Line` is 64 bytes, aligned to 64.
            let w = unsafe { _mm512_load_si512(line.0.as_ptr().cast()) };
            for (i, s) in sums.iter_mut().enumerate() {
                // SAFETY: row r0+i < m has k values; b*32+g*4+4 <= k.
                let x = unsafe { q.add(i * k + b * QK + g * 4).cast::<i32>().read_unaligned() };
                s[g % C] = _mm512_dpbusd_epi32(s[g % C], w, _mm512_set1_epi32(x));
            }
        }
        // SAFETY: a tile holds TILE scales per block.
        let dw = unsafe { _mm512_loadu_ps(a.scales.as_ptr().add(b * TILE)) };
        for (i, s) in sums.iter().enumerate() {
            let mut sum = s[0];
            for part in &s[1..] {
                sum = _mm512_add_epi32(sum, *part);
            }
            let sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(c[i * nb + b]));
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(d[i * nb + b]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), dd, acc[i]);
        }
    }
    let mask: __mmask16 = if a.cols >= TILE { !0 } else { (1u16 << a.cols) - 1 };
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: the caller's bound on `out`; the mask keeps to `cols`.
        unsafe { _mm512_mask_storeu_ps(a.out.add(i * a.ldo), mask, *v) };
    }
}

/// A job's tile times every row of its input on AVX2: each 64-byte line is
/// two halves of eight rows; `vpmaddubsw` wants one unsigned operand and
/// saturates at 16 bits, so the activation's absolute value is the unsigned
/// side and its sign moves onto the (signed) weight.
///
/// # Safety
/// The CPU must support AVX2 and FMA; the job's output bounds hold.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile_avx2(job: TileJob<'_>) {
    let TileJob { view, t, rows, out, ldo, cols, .. } = job;
    let (lines, scales) = view.tile(t);
    let (k, nb) = (rows.k, view.nb);
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    for r in 0..rows.m {
        let q = rows.q.as_ptr().wrapping_add(r * k);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            let mut sums = [_mm256_setzero_si256(); 2];
            for g in 0..LINES {
                // SAFETY: b*32+g*4+4 <= k.
                let x = _mm256_set1_epi32(unsafe { q.add(b * QK + g * 4).cast::<i32>().read_unaligned() });
                let ax = _mm256_sign_epi8(x, x);
                let line = lines[b * LINES + g].0.as_ptr();
                for (h, s) in sums.iter_mut().enumerate() {
                    // SAFETY: each half of a 64-byte line is 32 bytes.
                    let w = unsafe { _mm256_loadu_si256(line.add(h * 32).cast()) };
                    let w = _mm256_sign_epi8(_mm256_xor_si256(w, flip), x);
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, w), ones));
                }
            }
            let dx = _mm256_set1_ps(rows.d[r * nb + b]);
            for (h, s) in sums.iter().enumerate() {
                // SAFETY: a tile holds TILE scales per block.
                let dw = unsafe { _mm256_loadu_ps(scales.as_ptr().add(b * TILE + h * 8)) };
                // The weights were taken back to signed values above, so
                // the sum needs no offset correction.
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*s), _mm256_mul_ps(dw, dx), acc[h]);
            }
        }
        let mut row = [0f32; TILE];
        // SAFETY: `row` holds 16 floats.
        unsafe {
            _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
        }
        for (j, v) in row.iter().enumerate().take(cols) {
            // SAFETY: the caller's bound on `out`.
            unsafe { *out.add(r * ldo + j) = *v };
        }
    }
}

/// [`crate::scalar::quantize_row`] on AVX-512: the same scale, and
/// `vcvtps2dq` rounds to nearest even as the scalar path does.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_row_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], c: &mut [i32]) {
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        // SAFETY: a chunk holds 32 floats.
        let (v0, v1) = unsafe { (_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16))) };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
        let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        let dst = q[b * QK..(b + 1) * QK].as_mut_ptr();
        // SAFETY: the block's 32 bytes of `q`.
        unsafe {
            _mm_storeu_si128(dst.cast(), _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128(dst.add(16).cast(), _mm512_cvtepi32_epi8(i1));
        }
        d[b] = scale;
        c[b] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}
