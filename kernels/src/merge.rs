//! The split-K arithmetic of `cuda/attention_simple.cuh`, on the host: a
//! segment of key positions leaves a partial (running max, sum of
//! exponentials, unnormalized accumulator), and partials of disjoint
//! segments merge into the softmax-weighted average over all of them.
//! The device code does the same in the same order; these functions are its
//! specification and what the GPU check compares against.

use std::ops::Range;

/// What one segment of keys leaves for the merge.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    pub max: f32,
    pub sum: f32,
    /// Sum of `exp(score - max) * value`, not yet divided by `sum`.
    pub acc: Vec<f32>,
}

/// Attends the pre-scaled query `q` to `keys[range]` / `values[range]` with
/// an online softmax, as one warp does over its segment.
pub fn attend_segment(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], range: Range<usize>) -> Partial {
    let mut p = Partial { max: f32::NEG_INFINITY, sum: 0.0, acc: vec![0.0; q.len()] };
    for j in range {
        let s: f32 = q.iter().zip(&keys[j]).map(|(a, b)| a * b).sum();
        let m_new = p.max.max(s);
        let corr = (p.max - m_new).exp();
        let w = (s - m_new).exp();
        p.sum = p.sum * corr + w;
        for (a, v) in p.acc.iter_mut().zip(&values[j]) {
            *a = *a * corr + w * v;
        }
        p.max = m_new;
    }
    p
}

/// Merges the partials of disjoint segments covering a context; empty
/// segments (sum 0) contribute nothing.
pub fn merge_partials(parts: &[Partial]) -> Vec<f32> {
    let live = || parts.iter().filter(|p| p.sum > 0.0);
    let max = live().map(|p| p.max).fold(f32::NEG_INFINITY, f32::max);
    let dim = parts.first().map_or(0, |p| p.acc.len());
    let (mut sum, mut acc) = (0.0f32, vec![0.0f32; dim]);
    for p in live() {
        let w = (p.max - max).exp();
        sum += p.sum * w;
        for (a, x) in acc.iter_mut().zip(&p.acc) {
            *a += x * w;
        }
    }
    acc.iter().map(|a| a / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, d: usize, seed: u32) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| (0..d).map(|j| (((i * 31 + j * 17) as u32 ^ seed) % 23) as f32 / 4.0 - 2.5).collect())
            .collect()
    }

    fn softmax_attention(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
        let scores: Vec<f64> =
            keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum()).collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = w.iter().sum();
        (0..q.len())
            .map(|d| (w.iter().zip(values).map(|(w, v)| w * f64::from(v[d])).sum::<f64>() / total) as f32)
            .collect()
    }

    #[test]
    fn merged_segments_equal_one_softmax_over_the_whole_context() {
        let (n, d) = (37, 8);
        let (keys, values) = (vals(n, d, 5), vals(n, d, 9));
        let q: Vec<f32> = vals(1, d, 3)[0].iter().map(|x| x * 0.35).collect();
        let want = softmax_attention(&q, &keys, &values);
        // Segments of 10 over 37 positions, and one past the end (empty),
        // as the device's fixed segment grid produces.
        let parts: Vec<Partial> = (0..5)
            .map(|z| attend_segment(&q, &keys, &values, (z * 10).min(n)..((z + 1) * 10).min(n)))
            .collect();
        assert_eq!(parts[4].sum, 0.0, "the fifth segment is empty");
        let got = merge_partials(&parts);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let whole = merge_partials(&[attend_segment(&q, &keys, &values, 0..n)]);
        for (g, w) in whole.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
    }

    #[test]
    fn large_scores_do_not_overflow() {
        let keys = vec![vec![100.0f32], vec![90.0], vec![-50.0]];
        let values = vec![vec![1.0f32], vec![2.0], vec![3.0]];
        let q = [10.0f32];
        let parts = [attend_segment(&q, &keys, &values, 0..1), attend_segment(&q, &keys, &values, 1..3)];
        let out = merge_partials(&parts);
        assert!(out[0].is_finite() && (out[0] - 1.0).abs() < 1e-6, "{out:?}");
    }
}
