//! The portable kernels: the reference every other path must equal.

use crate::packed::{BlockOut, LINES, Q4_LINES, QK, TILE, TileJob};

/// Quantizes one row: per block of 32, scale `max |x| / 127`, values
/// rounded to nearest (ties to even), and the block's sum.
pub(crate) fn quantize_row(x: &[f32], mut out: BlockOut<'_>) {
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (qv, &v) in out.q[b * QK..(b + 1) * QK].iter_mut().zip(xs) {
            let r = (v * inv).round_ties_even() as i32;
            *qv = r as i8;
            sum += r;
        }
        out.block(b, scale, sum);
    }
}

/// Writes one input row's `cols` outputs.
///
/// # Safety
/// `out` has room for `cols` floats.
unsafe fn store(out: *mut f32, acc: &[f32; TILE], cols: usize) {
    for (j, &v) in acc.iter().enumerate().take(cols) {
        // SAFETY: the caller's bound.
        unsafe { *out.add(j) = v };
    }
}

/// A job's Q8_0 tile times every row of its input.
///
/// # Safety
/// The job's output bounds hold.
pub(crate) unsafe fn tile_q8_0(job: TileJob<'_>) {
    let TileJob { view, t, rows, out, ldo, cols, .. } = job;
    let (lines, scales) = view.tile(t);
    let (nb, k) = (view.nb, rows.k);
    for r in 0..rows.m {
        let mut acc = [0f32; TILE];
        for b in 0..nb {
            let mut sums = [0i32; TILE];
            for g in 0..LINES {
                let line = &lines[b * LINES + g].0;
                let x = &rows.q[r * k + b * QK + g * 4..][..4];
                for (j, s) in sums.iter_mut().enumerate() {
                    for i in 0..4 {
                        *s += i32::from(line[j * 4 + i]) * i32::from(x[i]);
                    }
                }
            }
            let (dx, cx) = (rows.d[r * nb + b], rows.c[r * nb + b]);
            for j in 0..TILE {
                let dd = scales[b * TILE + j] * dx;
                acc[j] = ((sums[j] - cx) as f32).mul_add(dd, acc[j]);
            }
        }
        // SAFETY: the caller's bound.
        unsafe { store(out.add(r * ldo), &acc, cols) };
    }
}

/// A job's Q4_1 tile times every row of its input: per block, the integer
/// sum of nibbles times inputs scaled by both scales, then the minimum
/// times the input block's sum, each a fused multiply-add.
///
/// # Safety
/// The job's output bounds hold.
pub(crate) unsafe fn tile_q4_1(job: TileJob<'_>) {
    let TileJob { view, t, rows, out, ldo, cols, .. } = job;
    let (lines, _) = view.tile(t);
    let (nb, k) = (view.nb, rows.k);
    for r in 0..rows.m {
        let mut acc = [0f32; TILE];
        for b in 0..nb {
            let block = &lines[b * Q4_LINES..(b + 1) * Q4_LINES];
            let x = &rows.q[r * k + b * QK..][..QK];
            let mut sums = [0i32; TILE];
            for (h, line) in block[1..].iter().enumerate() {
                for (j, s) in sums.iter_mut().enumerate() {
                    for i in 0..4 {
                        let byte = line.0[j * 4 + i];
                        *s += i32::from(byte & 0x0F) * i32::from(x[4 * h + i]);
                        *s += i32::from(byte >> 4) * i32::from(x[QK / 2 + 4 * h + i]);
                    }
                }
            }
            let (dx, sx) = (rows.d[r * nb + b], rows.s[r * nb + b]);
            let f16 = |at: usize| half::f16::from_le_bytes([block[0].0[at], block[0].0[at + 1]]).to_f32();
            for j in 0..TILE {
                let (dw, mw) = (f16(2 * j), f16(32 + 2 * j));
                acc[j] = (sums[j] as f32).mul_add(dw * dx, acc[j]);
                acc[j] = mw.mul_add(sx, acc[j]);
            }
        }
        // SAFETY: the caller's bound.
        unsafe { store(out.add(r * ldo), &acc, cols) };
    }
}
