//! The portable kernels: the reference every other path must equal.

use crate::q8::{LINES, QK, TILE, TileJob};

/// Quantizes one row: per block of 32, scale `max |x| / 127`, values
/// rounded to nearest (ties to even), and 128 times the block's sum.
pub(crate) fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], c: &mut [i32]) {
    for (b, xs) in x.chunks_exact(QK).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (qv, &v) in q[b * QK..(b + 1) * QK].iter_mut().zip(xs) {
            let r = (v * inv).round_ties_even() as i32;
            *qv = r as i8;
            sum += r;
        }
        d[b] = scale;
        c[b] = 128 * sum;
    }
}

/// A job's tile times every row of its input.
///
/// # Safety
/// The job's output bounds hold.
pub(crate) unsafe fn tile(job: TileJob<'_>) {
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
        for (j, &v) in acc.iter().enumerate().take(cols) {
            // SAFETY: the caller's bound.
            unsafe { *out.add(r * ldo + j) = v };
        }
    }
}
