//! Sampling on the GPU (`cuda/sample.cuh`): the per-row parameters the
//! kernel reads, and the distribution it draws from, written out here as
//! its specification (the GPU check compares the kernel's frequencies with
//! it; inferd-exec tests it against the host sampler).

/// Most candidates the kernel keeps (`MAX_TOP_K` in sample.cuh).
pub const MAX_TOP_K: u32 = 1024;
/// Threads of one sampling block.
pub const SAMPLE_THREADS: u32 = 1024;

/// One sampled row's parameters, in the kernel's C layout (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSample {
    /// > 0; greedy rows are `top_k` 1 at temperature 1.
    pub temperature: f32,
    /// In (0, 1]; must be 1 when `top_k` is 0.
    pub top_p: f32,
    /// 0: the whole vocabulary (Gumbel-max); else 1..=MAX_TOP_K.
    pub top_k: u32,
    pub pad: u32,
    /// The request's seed, or a fresh random one.
    pub seed: u64,
    /// The sequence's token count: one draw per position.
    pub counter: u64,
}

/// The kernel's entry point.
pub const SAMPLE_KERNEL: &str = "inferd_sample_rows";

impl RowSample {
    /// The row as the kernel reads it: eight little-endian u32 words.
    pub fn to_words(&self) -> [u32; 8] {
        [
            self.temperature.to_bits(),
            self.top_p.to_bits(),
            self.top_k,
            self.pad,
            self.seed as u32,
            (self.seed >> 32) as u32,
            self.counter as u32,
            (self.counter >> 32) as u32,
        ]
    }
}

/// The tokens a row can draw and their probabilities: the top `top_k`
/// logits (ties to the lower id), their softmax(l / T) probabilities over
/// the whole vocabulary, cut once their mass reaches `top_p` of the whole,
/// then renormalized. With `top_k` 0, the whole softmax.
pub fn kept_distribution(logits: &[f32], p: &RowSample) -> Vec<(u32, f64)> {
    let t = f64::from(p.temperature);
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let w = |x: f32| ((f64::from(x) - f64::from(max)) / t).exp();
    let total: f64 = logits.iter().map(|&x| w(x)).sum();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    let k = if p.top_k == 0 { logits.len() } else { (p.top_k.min(MAX_TOP_K) as usize).min(logits.len()) };
    let mut kept = Vec::new();
    let mut cum = 0.0;
    for &i in &order[..k] {
        cum += w(logits[i as usize]);
        kept.push((i, w(logits[i as usize])));
        if p.top_k != 0 && cum >= f64::from(p.top_p) * total {
            break;
        }
    }
    kept.iter().map(|&(i, x)| (i, x / cum)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(temperature: f32, top_p: f32, top_k: u32) -> RowSample {
        RowSample { temperature, top_p, top_k, pad: 0, seed: 1, counter: 2 }
    }

    #[test]
    fn row_sample_has_the_c_layout() {
        assert_eq!((std::mem::size_of::<RowSample>(), std::mem::align_of::<RowSample>()), (32, 8));
        let r = RowSample { temperature: 0.5, top_p: 0.9, top_k: 7, pad: 0, seed: 0x1_0000_0002, counter: 3 };
        // SAFETY: RowSample is repr(C) plain data of 32 bytes without padding.
        let bytes: [u8; 32] = unsafe { std::mem::transmute(r) };
        let words: Vec<u8> = r.to_words().iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(words, bytes, "the words are the struct's bytes");
    }

    #[test]
    fn kept_distributions_follow_top_k_top_p_and_ties() {
        let logits = [1.0f32, 3.0, 3.0, 0.0, 2.0];
        // Greedy: the larger of a tie is the lower id.
        assert_eq!(kept_distribution(&logits, &row(1.0, 1.0, 1)), [(1, 1.0)]);
        // Top 3 in order, renormalized.
        let d = kept_distribution(&logits, &row(1.0, 1.0, 3));
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 4]);
        assert!((d.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-12);
        // Top-p 0.5 of the whole mass: the two 3.0 logits hold 0.79 of it,
        // the first alone 0.40, so both are kept.
        let d = kept_distribution(&logits, &row(1.0, 0.5, 5));
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - 0.5).abs() < 1e-12);
        // No top-k: the whole softmax, temperature applied.
        let d = kept_distribution(&logits, &row(2.0, 1.0, 0));
        assert_eq!(d.len(), 5);
        let z: f64 = logits.iter().map(|&x| (f64::from(x) / 2.0).exp()).sum();
        assert!((d.iter().find(|x| x.0 == 3).unwrap().1 - 1.0 / z).abs() < 1e-12);
    }
}
