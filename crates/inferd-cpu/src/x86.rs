//! The x86-64 kernels: AVX-512 VNNI and AVX2, for Q8_0 and Q4_1 tiles
//! (`Q4` picks the format at compile time). Each computes exactly what
//! `scalar` does: the same integer sums, then per block the same multiply
//! of the two scales and the same fused multiply-adds into the row's
//! accumulator.

use std::arch::x86_64::*;

use crate::packed::{BlockOut, LINES, Line, Q4_LINES, QK, QuantizedRows, TILE, TileJob};

/// Rows of input the one-tile AVX-512 kernel takes per pass over a tile.
const MR: usize = 8;
/// Rows of input the two-tile AVX-512 kernel takes per pass.
const MR2: usize = 6;

/// A job's tile, or pair of tiles, times every row of its input on AVX-512
/// VNNI. Pairs are the fast case: each activation broadcast then feeds two
/// dot products and each weight line four, which keeps the loads below the
/// two multiply-add ports' pace; one tile at a time, the loads were the
/// limit.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and AVX-512 VNNI; the job's
/// output bounds hold (see [`TileJob`]); the tiles are Q4_1 when `Q4`,
/// else Q8_0.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn tiles_avx512<const Q4: bool>(job: TileJob<'_>) {
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
                    1 => rows_avx512::<Q4, 1, 4>(a),
                    2 => rows_avx512::<Q4, 2, 2>(a),
                    3 => rows_avx512::<Q4, 3, 2>(a),
                    4 => rows_avx512::<Q4, 4, 1>(a),
                    5 => rows_avx512::<Q4, 5, 1>(a),
                    6 => rows_avx512::<Q4, 6, 1>(a),
                    7 => rows_avx512::<Q4, 7, 1>(a),
                    _ => rows_avx512::<Q4, 8, 1>(a),
                },
                Some((lines, scales)) => {
                    let b = Args { lines, scales, out: out.wrapping_add(TILE), cols: job.cols, ..a };
                    match n {
                        1 => {
                            rows_avx512::<Q4, 1, 4>(a);
                            rows_avx512::<Q4, 1, 4>(b);
                        }
                        2 => pair_avx512::<Q4, 2>(a, b),
                        3 => pair_avx512::<Q4, 3>(a, b),
                        4 => pair_avx512::<Q4, 4>(a, b),
                        5 => pair_avx512::<Q4, 5>(a, b),
                        _ => pair_avx512::<Q4, 6>(a, b),
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

/// Block `blk`'s lines of a tile: eight Q8_0 value lines, or Q4_1's scale
/// line and four nibble lines.
#[inline(always)]
fn block_lines<const Q4: bool>(lines: &[Line], blk: usize) -> &[Line] {
    if Q4 { &lines[blk * Q4_LINES..(blk + 1) * Q4_LINES] } else { &lines[blk * LINES..(blk + 1) * LINES] }
}

/// Operand `g` of a block: values `4g..4g+4` of each of the tile's 16 rows
/// as unsigned bytes. Q4_1 keeps values `4g..` in the low nibbles of line
/// `g` for `g < 4`, and `4g..` for `g >= 4` in the high nibbles of line `g - 4`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn operand<const Q4: bool>(block: &[Line], g: usize) -> __m512i {
    if Q4 {
        // SAFETY: a `Line` is 64 bytes, aligned to 64.
        let v = unsafe { _mm512_load_si512(block[1 + g % 4].0.as_ptr().cast()) };
        let v = if g < 4 { v } else { _mm512_srli_epi16::<4>(v) };
        _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
    } else {
        // SAFETY: as above.
        unsafe { _mm512_load_si512(block[g].0.as_ptr().cast()) }
    }
}

/// A block's per-row weight scales: Q8_0's (and zeros), or Q4_1's `d` and `m`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn block_scales<const Q4: bool>(block: &[Line], scales: &[f32], blk: usize) -> (__m512, __m512) {
    if Q4 {
        // SAFETY: a `Line` is 64 bytes, aligned to 64: 16 f16 `d`, then 16 f16 `m`.
        let v = unsafe { _mm512_load_si512(block[0].0.as_ptr().cast()) };
        (_mm512_cvtph_ps(_mm512_castsi512_si256(v)), _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(v)))
    } else {
        let s = &scales[blk * TILE..(blk + 1) * TILE];
        // SAFETY: `s` holds 16 floats.
        (unsafe { _mm512_loadu_ps(s.as_ptr()) }, _mm512_setzero_ps())
    }
}

/// Where one input row's integer sums for a block (at `at` in the rows'
/// per-block figures) start: at zero for Q4_1, and for Q8_0 at minus what
/// the weights' +128 offset will add, so that no subtraction is left for
/// after the dot products (the sums are exact either way).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn sums_start<const Q4: bool>(rows: &QuantizedRows, at: usize) -> __m512i {
    if Q4 { _mm512_setzero_si512() } else { _mm512_set1_epi32(-rows.c[at]) }
}

/// Adds one input row's block (at `at` in the rows' per-block figures)
/// into its accumulator, from the block's integer sums and weight scales.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn accumulate<const Q4: bool>(
    acc: __m512,
    sum: __m512i,
    (dw, mw): (__m512, __m512),
    rows: &QuantizedRows,
    at: usize,
) -> __m512 {
    let dd = _mm512_mul_ps(dw, _mm512_set1_ps(rows.d[at]));
    let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), dd, acc);
    if Q4 { _mm512_fmadd_ps(mw, _mm512_set1_ps(rows.s[at]), acc) } else { acc }
}

/// `R` input rows against two tiles at once.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn pair_avx512<const Q4: bool, const R: usize>(a: Args<'_>, b: Args<'_>) {
    let (k, nb) = (a.rows.k, a.nb);
    debug_assert!(a.r0 + R <= a.rows.m);
    let q = a.rows.q.as_ptr().wrapping_add(a.r0 * k);
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for blk in 0..nb {
        let mut sums: [[__m512i; 2]; R] =
            std::array::from_fn(|i| [sums_start::<Q4>(a.rows, (a.r0 + i) * nb + blk); 2]);
        let (block_a, block_b) = (block_lines::<Q4>(a.lines, blk), block_lines::<Q4>(b.lines, blk));
        for g in 0..LINES {
            let (wa, wb) = (operand::<Q4>(block_a, g), operand::<Q4>(block_b, g));
            for (i, s) in sums.iter_mut().enumerate() {
                // SAFETY: row r0+i < m has k values; blk*32+g*4+4 <= k.
                let x = _mm512_set1_epi32(unsafe {
                    q.add(i * k + blk * QK + g * 4).cast::<i32>().read_unaligned()
                });
                s[0] = _mm512_dpbusd_epi32(s[0], wa, x);
                s[1] = _mm512_dpbusd_epi32(s[1], wb, x);
            }
        }
        let w = [block_scales::<Q4>(block_a, a.scales, blk), block_scales::<Q4>(block_b, b.scales, blk)];
        for (i, s) in sums.iter().enumerate() {
            let at = (a.r0 + i) * nb + blk;
            for h in 0..2 {
                acc[i][h] = accumulate::<Q4>(acc[i][h], s[h], w[h], a.rows, at);
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
unsafe fn rows_avx512<const Q4: bool, const R: usize, const C: usize>(a: Args<'_>) {
    let (k, nb) = (a.rows.k, a.nb);
    debug_assert!(a.r0 + R <= a.rows.m);
    let q = a.rows.q.as_ptr().wrapping_add(a.r0 * k);
    let mut acc = [_mm512_setzero_ps(); R];
    for blk in 0..nb {
        let mut sums = [[_mm512_setzero_si512(); C]; R];
        for (i, s) in sums.iter_mut().enumerate() {
            s[0] = sums_start::<Q4>(a.rows, (a.r0 + i) * nb + blk);
        }
        let block = block_lines::<Q4>(a.lines, blk);
        for g in 0..LINES {
            let w = operand::<Q4>(block, g);
            for (i, s) in sums.iter_mut().enumerate() {
                // SAFETY: row r0+i < m has k values; blk*32+g*4+4 <= k.
                let x = unsafe { q.add(i * k + blk * QK + g * 4).cast::<i32>().read_unaligned() };
                s[g % C] = _mm512_dpbusd_epi32(s[g % C], w, _mm512_set1_epi32(x));
            }
        }
        let w = block_scales::<Q4>(block, a.scales, blk);
        for (i, s) in sums.iter().enumerate() {
            let mut sum = s[0];
            for part in &s[1..] {
                sum = _mm512_add_epi32(sum, *part);
            }
            acc[i] = accumulate::<Q4>(acc[i], sum, w, a.rows, (a.r0 + i) * nb + blk);
        }
    }
    let mask: __mmask16 = if a.cols >= TILE { !0 } else { (1u16 << a.cols) - 1 };
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: the caller's bound on `out`; the mask keeps to `cols`.
        unsafe { _mm512_mask_storeu_ps(a.out.add(i * a.ldo), mask, *v) };
    }
}

/// Rows of input the AVX2 kernels take per pass over a tile.
const MR_AVX2: usize = 4;

/// A job's tile times every row of its input on AVX2, four input rows per
/// pass, so that each weight line is loaded and prepared once for four
/// rows. `vpmaddubsw` wants one unsigned operand and saturates at 16 bits:
///
/// - Q8_0: the weight's magnitude is the unsigned side and its sign moves
///   onto the input (|w| ≤ 128 and |x| ≤ 127, so a pair cannot saturate,
///   -128 included); each product pair is widened to 32 bits at once. Both
///   halves of the tile (rows 0..8 and 8..16 of each line) go in one pass,
///   so each broadcast input serves both (one half at a time ran about 20 %
///   slower).
/// - Q4_1: the nibbles are unsigned already. A pair is at most 2 × 15 ×
///   127, so a block's eight pairs per lane (at most 30,480) are summed in
///   16 bits and widened once per block. One half of the tile at a time:
///   both halves at once, each broadcast serving two, ran 10–20 % slower
///   on an AVX2-only EPYC (more registers than AVX2 has, so spills).
///
/// The inner loops read the inputs and their per-block figures through
/// pointers checked once per call ([`RowFigures`]): with an index check
/// per block, the Q4_1 loop was a third scalar bookkeeping, and the
/// kernel ran about a quarter slower.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; the job's output bounds hold;
/// the tile is Q4_1 when `Q4`, else Q8_0.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_avx2<const Q4: bool>(job: TileJob<'_>) {
    let m = job.rows.m;
    let mut r = 0;
    while r < m {
        let n = (m - r).min(MR_AVX2);
        // SAFETY (of each call): the caller's guarantees, for rows r..r+n.
        if Q4 {
            for half in 0..2 {
                if half * 8 >= job.cols {
                    break;
                }
                unsafe {
                    match n {
                        1 => q4_rows_avx2::<1>(job, r, half),
                        2 => q4_rows_avx2::<2>(job, r, half),
                        3 => q4_rows_avx2::<3>(job, r, half),
                        _ => q4_rows_avx2::<4>(job, r, half),
                    }
                }
            }
        } else {
            unsafe {
                match n {
                    1 => q8_rows_avx2::<1>(job, r),
                    2 => q8_rows_avx2::<2>(job, r),
                    3 => q8_rows_avx2::<3>(job, r),
                    _ => q8_rows_avx2::<4>(job, r),
                }
            }
        }
        r += n;
    }
}

/// Stores 8 lanes of a tile's row at `out`, the first `n` of them.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store8(out: *mut f32, n: usize, v: __m256) {
    let mask =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // SAFETY: the caller's bound on `out` for `n` floats (up to 8).
    unsafe { _mm256_maskstore_ps(out, mask, v) };
}

/// Four bytes of input row `i` (of rows starting at `x`, `k` apart) from
/// value `at`, broadcast to every lane.
///
/// # Safety
/// Row `i` has `k` values and `at + 4 <= k`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn x4(x: *const i8, k: usize, i: usize, at: usize) -> __m256i {
    // SAFETY: the caller's bound.
    _mm256_set1_epi32(unsafe { x.add(i * k + at).cast::<i32>().read_unaligned() })
}

/// The per-block figures of input rows `r0..` (`nb` blocks a row): a row's
/// scales and sums, read without bounds checks in the kernels' inner loops.
#[derive(Clone, Copy)]
struct RowFigures {
    d: *const f32,
    s: *const f32,
    nb: usize,
}

impl RowFigures {
    /// Input rows `r0..r0 + n`'s figures.
    fn new(rows: &QuantizedRows, r0: usize, n: usize, nb: usize) -> RowFigures {
        assert!(rows.d.len() >= (r0 + n) * nb && rows.s.len() >= (r0 + n) * nb);
        RowFigures { d: rows.d[r0 * nb..].as_ptr(), s: rows.s[r0 * nb..].as_ptr(), nb }
    }

    /// Row `i`'s scale and sum for block `b`, broadcast to every lane.
    ///
    /// # Safety
    /// `i` is below the `n` rows and `b` below the `nb` blocks it was made with.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn at(self, i: usize, b: usize) -> (__m256, __m256) {
        // SAFETY: the caller's bounds, checked against the buffers in `new`.
        unsafe {
            (
                _mm256_broadcast_ss(&*self.d.add(i * self.nb + b)),
                _mm256_broadcast_ss(&*self.s.add(i * self.nb + b)),
            )
        }
    }
}

/// `R` Q8_0 input rows from `r0` against a job's whole tile.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q8_rows_avx2<const R: usize>(job: TileJob<'_>, r0: usize) {
    let TileJob { view, t, rows, out, ldo, cols, .. } = job;
    let (lines, scales) = view.tile(t);
    let (k, nb) = (rows.k, view.nb);
    assert!(r0 + R <= rows.m && rows.q.len() >= rows.m * k && k == nb * QK);
    let (lines, scales) = (&lines[..nb * LINES], &scales[..nb * TILE]);
    let figures = RowFigures::new(rows, r0, R, nb);
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    let x = rows.q[r0 * k..].as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (b, (block, dw)) in lines.chunks_exact(LINES).zip(scales.chunks_exact(TILE)).enumerate() {
        let mut sums = [[_mm256_setzero_si256(); 2]; R];
        for (g, line) in block.iter().enumerate() {
            let at = line.0.as_ptr();
            // Back to two's complement, then the unsigned magnitude.
            // SAFETY: a line is 64 bytes, aligned to 64.
            let w = unsafe {
                [
                    _mm256_xor_si256(_mm256_load_si256(at.cast()), flip),
                    _mm256_xor_si256(_mm256_load_si256(at.add(32).cast()), flip),
                ]
            };
            let aw = [_mm256_abs_epi8(w[0]), _mm256_abs_epi8(w[1])];
            for (i, s) in sums.iter_mut().enumerate() {
                // SAFETY: row r0+i < m has k values; b*32+g*4+4 <= k.
                let xb = unsafe { x4(x, k, i, b * QK + g * 4) };
                for h in 0..2 {
                    let p = _mm256_maddubs_epi16(aw[h], _mm256_sign_epi8(xb, w[h]));
                    s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        for h in 0..2 {
            // SAFETY: a tile holds TILE scales per block.
            let dw = unsafe { _mm256_loadu_ps(dw.as_ptr().add(h * 8)) };
            for i in 0..R {
                // The weights were taken back to signed values, so the sum
                // needs no offset correction.
                // SAFETY: i < R rows, b < nb blocks.
                let (dx, _) = unsafe { figures.at(i, b) };
                let dd = _mm256_mul_ps(dw, dx);
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i][h]), dd, acc[i][h]);
            }
        }
    }
    for (i, v) in acc.iter().enumerate() {
        for (h, &v) in v.iter().enumerate().take(cols.div_ceil(8)) {
            // SAFETY: the caller's bound on `out`, kept to `cols`.
            unsafe { store8(out.add((r0 + i) * ldo + h * 8), cols - h * 8, v) };
        }
    }
}

/// `R` Q4_1 input rows from `r0` against half `half` of a job's tile.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q4_rows_avx2<const R: usize>(job: TileJob<'_>, r0: usize, half: usize) {
    let TileJob { view, t, rows, out, ldo, cols, .. } = job;
    let (lines, _) = view.tile(t);
    let (k, nb) = (rows.k, view.nb);
    assert!(r0 + R <= rows.m && rows.q.len() >= rows.m * k && k == nb * QK && half < 2);
    let figures = RowFigures::new(rows, r0, R, nb);
    let ones = _mm256_set1_epi16(1);
    let nibble = _mm256_set1_epi8(0x0F);
    let x = rows.q[r0 * k..].as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, block) in lines[..nb * Q4_LINES].chunks_exact(Q4_LINES).enumerate() {
        let mut sums = [_mm256_setzero_si256(); R];
        for (h, line) in block[1..].iter().enumerate() {
            // SAFETY: each half of a 64-byte line, aligned to 64, is 32 aligned bytes.
            let w = unsafe { _mm256_load_si256(line.0.as_ptr().add(half * 32).cast()) };
            let (lo, hi) = (_mm256_and_si256(w, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(w), nibble));
            for (i, s) in sums.iter_mut().enumerate() {
                // SAFETY: row r0+i < m has k values; b*32+16+h*4+4 <= k.
                let (xl, xh) = unsafe { (x4(x, k, i, b * QK + h * 4), x4(x, k, i, b * QK + QK / 2 + h * 4)) };
                let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                *s = _mm256_add_epi16(*s, p);
            }
        }
        let at = block[0].0.as_ptr();
        // SAFETY: the scale line holds 16 f16 `d` then 16 f16 `m`.
        let (dw, mw) = unsafe {
            (
                _mm256_cvtph_ps(_mm_load_si128(at.add(half * 16).cast())),
                _mm256_cvtph_ps(_mm_load_si128(at.add(32 + half * 16).cast())),
            )
        };
        for (i, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
            // SAFETY: i < R rows, b < nb blocks.
            let (dx, sx) = unsafe { figures.at(i, b) };
            let sum = _mm256_madd_epi16(*s, ones);
            let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw, dx), *a);
            *a = _mm256_fmadd_ps(mw, sx, v);
        }
    }
    for (i, v) in acc.iter().enumerate() {
        // SAFETY: the caller's bound on `out`, kept to `cols`.
        unsafe { store8(out.add((r0 + i) * ldo + half * 8), cols - half * 8, *v) };
    }
}

/// Sixteen vectors reduced at once: lane `j` of the result is `op` over
/// the sixteen lanes of `v[j]`. Four rounds of shuffles, each halving the
/// vectors and the lanes left to combine, cost 45 instructions where sixteen
/// separate horizontal reductions cost about 130.
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce16(v: [__m512; 16], op: impl Fn(__m512, __m512) -> __m512) -> __m512 {
    // Pairs: in each 128-bit lane, [a0∘a2, b0∘b2, a1∘a3, b1∘b3].
    let t: [__m512; 8] = std::array::from_fn(|i| {
        op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]))
    });
    // Fours: in each 128-bit lane, one partial result for each of 4 vectors.
    let u: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (t[2 * i], t[2 * i + 1]);
        op(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
    });
    // The 128-bit lanes: [a.L0∘a.L1, a.L2∘a.L3, b.L0∘b.L1, b.L2∘b.L3].
    let lanes = |a: __m512, b: __m512| {
        op(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    };
    lanes(lanes(u[0], u[1]), lanes(u[2], u[3]))
}

/// [`crate::scalar::quantize_row`] on AVX-512: the same scale, and
/// `vcvtps2dq` rounds to nearest even as the scalar path does. Blocks go
/// sixteen at a time, so that their maxima, scales and sums are reduced and
/// divided in whole vectors; the exact operations (max, IEEE division,
/// integer sums) make the order of no consequence.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_row_avx512(x: &[f32], mut out: BlockOut<'_>) {
    const GROUP: usize = 16;
    let nb = x.len() / QK;
    let load = |b: usize| {
        let xs = &x[b * QK..(b + 1) * QK];
        // SAFETY: a block holds 32 floats.
        unsafe { (_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16))) }
    };
    // Block `b` quantized with `inv`: its 32 bytes stored, its 16 partial sums returned.
    let quantize = |q: &mut [i8], b: usize, inv: __m512| {
        let (v0, v1) = load(b);
        let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
        let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        let dst = q[b * QK..(b + 1) * QK].as_mut_ptr();
        // SAFETY: the block's 32 bytes of `q`.
        unsafe {
            _mm_storeu_si128(dst.cast(), _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128(dst.add(16).cast(), _mm512_cvtepi32_epi8(i1));
        }
        _mm512_add_epi32(i0, i1)
    };
    let mut b = 0;
    while b + GROUP <= nb {
        let amax = reduce16(
            std::array::from_fn(|j| {
                let (v0, v1) = load(b + j);
                _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))
            }),
            |p, q| _mm512_max_ps(p, q),
        );
        let scale = _mm512_div_ps(amax, _mm512_set1_ps(127.0));
        let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(scale, _mm512_setzero_ps());
        let inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0), scale);
        let mut invs = [0f32; GROUP];
        // SAFETY: `invs` holds 16 floats.
        unsafe { _mm512_storeu_ps(invs.as_mut_ptr(), inv) };
        let parts: [__m512; GROUP] = std::array::from_fn(|j| {
            _mm512_castsi512_ps(quantize(&mut out.q[..], b + j, _mm512_set1_ps(invs[j])))
        });
        // Integer lanes carried in float registers: the shuffles move bits,
        // and the adds are done as integers.
        let add = |p: __m512, q: __m512| {
            _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_castps_si512(q)))
        };
        let sums = _mm512_castps_si512(reduce16(parts, add));
        let mut group_sums = [0i32; GROUP];
        let mut scales = [0f32; GROUP];
        // SAFETY: each array holds 16 elements.
        unsafe {
            _mm512_storeu_si512(group_sums.as_mut_ptr().cast(), sums);
            _mm512_storeu_ps(scales.as_mut_ptr(), scale);
        }
        for j in 0..GROUP {
            out.block(b + j, scales[j], group_sums[j]);
        }
        b += GROUP;
    }
    for b in b..nb {
        let (v0, v1) = load(b);
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let sum = _mm512_reduce_add_epi32(quantize(&mut out.q[..], b, inv));
        out.block(b, scale, sum);
    }
}

/// [`crate::scalar::quantize_row`] on AVX2: the same scale and inverse,
/// and `vcvtps2dq` rounds to nearest even as the scalar path does.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn quantize_row_avx2(x: &[f32], mut out: BlockOut<'_>) {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    // `vpackssdw` and `vpacksswb` interleave 128-bit lanes; this puts the
    // 32 bytes back in order, four at a time.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..x.len() / QK {
        let xs = &x[b * QK..(b + 1) * QK];
        // SAFETY: a block holds 32 floats.
        let v: [__m256; 4] = std::array::from_fn(|j| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * j)) });
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let i: [__m256i; 4] = std::array::from_fn(|j| _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv)));
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        // SAFETY: the block's 32 bytes of `q`.
        unsafe {
            _mm256_storeu_si256(
                out.q[b * QK..(b + 1) * QK].as_mut_ptr().cast(),
                _mm256_permutevar8x32_epi32(bytes, order),
            )
        };
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        out.block(b, scale, _mm_cvtsi128_si32(s));
    }
}
