//! A measured model of how long a step takes, so the scheduler can size
//! prefill chunks that keep decoding sequences' steps under a target.
//!
//! A step's time is modelled as linear in four features: a fixed cost, the
//! packed tokens (every matmul row), the sequences (one logits row and one
//! sample each) and the attention work (each query token times the context
//! it attends to). The coefficients are a least-squares fit, kept
//! non-negative, over the most recent steps the engine reports, so the model
//! follows the machine it runs on (and a neighbour that takes a core) rather
//! than a table measured elsewhere. The scheduler never reads a clock: the
//! engine times its steps and reports them through
//! [`Scheduler::observe_step`](crate::Scheduler::observe_step).

use std::collections::VecDeque;
use std::time::Duration;

use crate::SchedulerOutput;

/// Steps the fit remembers; older ones are forgotten, so the model follows
/// a machine whose speed changes.
const WINDOW: usize = 256;
/// Steps observed before the model plans anything.
const MIN_OBSERVATIONS: usize = 4;
/// Features are scaled to similar magnitudes before the fit.
const SCALE: [f64; 4] = [1.0, 1.0 / 128.0, 1.0 / 16.0, 1.0 / 65_536.0];

/// The work in a step, as the cost model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Packed query tokens.
    pub tokens: usize,
    /// Sequences (logits rows).
    pub seqs: usize,
    /// Sum over query tokens of the context each attends to.
    pub attention: f64,
}

impl StepShape {
    /// The work of one sequence's `tokens` query tokens that start after
    /// `computed` cached ones: token `j` (1-based) attends to `computed + j`.
    pub fn chunk(computed: usize, tokens: usize) -> StepShape {
        let (c, q) = (computed as f64, tokens as f64);
        StepShape { tokens, seqs: usize::from(tokens > 0), attention: q * c + q * (q + 1.0) / 2.0 }
    }

    /// The work of a whole planned step.
    pub fn of(out: &SchedulerOutput) -> StepShape {
        let running = out.running_seqs.iter().map(|s| (s.num_computed_tokens, s.num_scheduled_tokens));
        let new = out.new_seqs.iter().map(|s| (s.num_computed_tokens, s.num_scheduled_tokens));
        running.chain(new).fold(StepShape::default(), |acc, (c, q)| acc + StepShape::chunk(c, q))
    }

    fn features(&self) -> [f64; 4] {
        let raw = [1.0, self.tokens as f64, self.seqs as f64, self.attention];
        std::array::from_fn(|i| raw[i] * SCALE[i])
    }
}

impl std::ops::Add for StepShape {
    type Output = StepShape;
    fn add(self, o: StepShape) -> StepShape {
        StepShape {
            tokens: self.tokens + o.tokens,
            seqs: self.seqs + o.seqs,
            attention: self.attention + o.attention,
        }
    }
}

/// Step time as a fitted linear function of a step's shape.
#[derive(Debug, Clone, Default)]
pub struct StepCostModel {
    samples: VecDeque<([f64; 4], f64)>,
    /// Milliseconds per scaled feature; `None` until the fit is usable.
    coef: Option<[f64; 4]>,
}

impl StepCostModel {
    /// Records a step of `shape` that took `took`, and refits.
    pub fn observe(&mut self, shape: StepShape, took: Duration) {
        if shape.tokens == 0 {
            return;
        }
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((shape.features(), took.as_secs_f64() * 1e3));
        self.coef = self.fit();
    }

    /// The predicted time of a step of `shape`, once enough steps are seen.
    pub fn predict_ms(&self, shape: StepShape) -> Option<f64> {
        let c = self.coef?;
        Some(shape.features().iter().zip(c).map(|(x, c)| x * c).sum())
    }

    /// The fitted coefficients in natural units: milliseconds fixed, per
    /// token, per sequence and per attended (query, key) pair.
    pub fn coefficients(&self) -> Option<[f64; 4]> {
        self.coef.map(|c| std::array::from_fn(|i| c[i] * SCALE[i]))
    }

    /// Steps the current fit rests on.
    pub fn observations(&self) -> usize {
        self.samples.len()
    }

    /// The most tokens, up to `limit`, that a chunk starting after
    /// `computed` cached tokens can add to a step already holding `base`
    /// while the step stays within `target_ms`. `None` until the model can
    /// predict.
    pub fn max_chunk(&self, base: StepShape, computed: usize, limit: usize, target_ms: f64) -> Option<usize> {
        self.coef?;
        let fits = |n: usize| {
            let shape = base + StepShape::chunk(computed, n);
            self.predict_ms(shape).is_some_and(|t| t <= target_ms)
        };
        // Predicted time grows with n (the coefficients are non-negative).
        let (mut lo, mut hi) = (0, limit);
        if fits(hi) {
            return Some(hi);
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) { lo = mid } else { hi = mid }
        }
        Some(lo)
    }

    /// Least squares over the window with every coefficient kept
    /// non-negative: a feature whose coefficient comes out negative is
    /// dropped and the rest refitted (an active-set fit, exact for four
    /// features). Needs the per-token coefficient to be positive, or it
    /// would plan unbounded chunks.
    fn fit(&self) -> Option<[f64; 4]> {
        if self.samples.len() < MIN_OBSERVATIONS {
            return None;
        }
        let mut active = [true; 4];
        loop {
            let coef = self.solve(&active)?;
            match (0..4).filter(|&i| active[i] && coef[i] < 0.0).min_by(|&a, &b| coef[a].total_cmp(&coef[b]))
            {
                Some(i) => active[i] = false,
                None if coef[1] > 0.0 => return Some(coef),
                None => return None,
            }
        }
    }

    /// Ridge-regularised normal equations over the active features.
    fn solve(&self, active: &[bool; 4]) -> Option<[f64; 4]> {
        let idx: Vec<usize> = (0..4).filter(|&i| active[i]).collect();
        let n = idx.len();
        if n == 0 {
            return None;
        }
        let mut a = vec![vec![0.0; n + 1]; n];
        for (x, y) in &self.samples {
            for (r, &i) in idx.iter().enumerate() {
                for (c, &j) in idx.iter().enumerate() {
                    a[r][c] += x[i] * x[j];
                }
                a[r][n] += x[i] * y;
            }
        }
        // A small ridge keeps features that never varied (one batch size
        // only, say) from making the system singular.
        let ridge = 1e-6 * (0..n).map(|r| a[r][r]).sum::<f64>().max(1e-12);
        for (r, row) in a.iter_mut().enumerate() {
            row[r] += ridge;
        }
        for col in 0..n {
            let pivot = (col..n).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
            a.swap(col, pivot);
            let d = a[col][col];
            if d.abs() < 1e-300 {
                return None;
            }
            let pivot_row = a[col].clone();
            for (r, row) in a.iter_mut().enumerate().take(n) {
                if r != col {
                    let f = row[col] / d;
                    for (x, p) in row[col..=n].iter_mut().zip(&pivot_row[col..=n]) {
                        *x -= f * p;
                    }
                }
            }
        }
        let mut coef = [0.0; 4];
        for (r, &i) in idx.iter().enumerate() {
            coef[i] = a[r][n] / a[r][r];
        }
        Some(coef)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine with a 5 ms fixed cost, 2 ms a token, 0.3 ms a sequence
    /// and 1 µs per attended pair.
    fn truth(s: StepShape) -> f64 {
        5.0 + 2.0 * s.tokens as f64 + 0.3 * s.seqs as f64 + 1e-3 * s.attention
    }

    fn observe(m: &mut StepCostModel, s: StepShape) {
        m.observe(s, Duration::from_secs_f64(truth(s) / 1e3));
    }

    #[test]
    fn chunk_attention_counts_each_query_against_its_context() {
        // Three tokens after ten cached: they see 11, 12 and 13 keys.
        assert_eq!(StepShape::chunk(10, 3), StepShape { tokens: 3, seqs: 1, attention: 36.0 });
        assert_eq!(StepShape::chunk(5, 0), StepShape::default());
    }

    #[test]
    fn learns_a_linear_machine_and_plans_chunks_within_the_target() {
        let mut m = StepCostModel::default();
        assert_eq!(m.max_chunk(StepShape::default(), 0, 512, 100.0), None, "no plan before any step");
        // Decode steps of several batch sizes and a few prefill chunks.
        for b in [1, 4, 8, 16, 32] {
            let decode = (0..b).fold(StepShape::default(), |acc, i| acc + StepShape::chunk(100 + 7 * i, 1));
            observe(&mut m, decode);
        }
        for (c, n) in [(0, 512), (512, 256), (0, 64)] {
            observe(&mut m, StepShape::chunk(c, n));
        }
        let [fixed, per_token, per_seq, per_pair] = m.coefficients().unwrap();
        assert!((fixed - 5.0).abs() < 0.05, "{fixed}");
        assert!((per_token - 2.0).abs() < 0.01, "{per_token}");
        assert!((per_seq - 0.3).abs() < 0.05, "{per_seq}");
        assert!((per_pair - 1e-3).abs() < 1e-5, "{per_pair}");
        // Eight decodes and a chunk at offset 300: the largest chunk that
        // keeps the step within 100 ms, and not one token more.
        let base = (0..8).fold(StepShape::default(), |acc, _| acc + StepShape::chunk(200, 1));
        let n = m.max_chunk(base, 300, 512, 100.0).unwrap();
        assert!(truth(base + StepShape::chunk(300, n)) <= 100.5, "{n}");
        assert!(truth(base + StepShape::chunk(300, n + 1)) > 99.5, "{n}");
        assert_eq!(m.max_chunk(StepShape::default(), 0, 8, 1e6), Some(8), "bounded by the limit");
        assert_eq!(m.max_chunk(base, 0, 512, 1.0), Some(0), "the base alone is over the target");
    }

    #[test]
    fn coefficients_stay_non_negative_and_old_steps_are_forgotten() {
        let mut m = StepCostModel::default();
        // Only decode steps of one batch size: tokens and sequences move
        // together, and the fit must still not go negative.
        for _ in 0..10 {
            observe(&mut m, StepShape::chunk(50, 1) + StepShape::chunk(60, 1));
        }
        let c = m.coefficients().expect("a usable fit");
        assert!(c.iter().all(|&x| x >= 0.0), "{c:?}");
        // The machine slows down threefold: once the window has turned
        // over, predictions follow.
        for i in 0..WINDOW {
            let s = StepShape::chunk(i % 300, 1 + i % 64);
            m.observe(s, Duration::from_secs_f64(3.0 * truth(s) / 1e3));
        }
        assert_eq!(m.observations(), WINDOW);
        let probe = StepShape::chunk(100, 32);
        let p = m.predict_ms(probe).unwrap();
        assert!((p - 3.0 * truth(probe)).abs() < 0.01 * p, "{p} vs {}", 3.0 * truth(probe));
    }
}
