use std::time::Duration;

use inferd_core::TokenId;

use crate::SchedError;

/// Compiled shapes of a static-shape backend (Neuron): every step fits one
/// batch size and one token count of these, and reports the bucket it pads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeBuckets {
    /// Numbers of sequences per step the backend was compiled for, ascending.
    pub batch_sizes: Vec<usize>,
    /// Numbers of packed tokens per step the backend was compiled for, ascending.
    pub token_counts: Vec<usize>,
}

impl ShapeBuckets {
    /// The smallest compiled batch size that holds `n` sequences.
    pub fn batch_bucket(&self, n: usize) -> Option<usize> {
        self.batch_sizes.iter().copied().find(|&b| b >= n)
    }

    /// The smallest compiled token count that holds `n` tokens.
    pub fn token_bucket(&self, n: usize) -> Option<usize> {
        self.token_counts.iter().copied().find(|&t| t >= n)
    }

    /// The most tokens one step can hold: the longest prompt that can be
    /// prefilled whole.
    pub fn max_tokens(&self) -> usize {
        self.token_counts.last().copied().unwrap_or(0)
    }

    /// The most sequences one step can hold.
    pub fn max_batch(&self) -> usize {
        self.batch_sizes.last().copied().unwrap_or(0)
    }
}

/// How the scheduler shapes a step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StepPolicy {
    /// One token budget shared by running and waiting sequences: decodes
    /// and prefill chunks in the same step, long prompts prefilled in
    /// chunks, preemption by recompute when KV runs out (CPU, CUDA).
    #[default]
    Mixed,
    /// Only compiled shapes run (Neuron): a step is all prefill or all
    /// decode; a prompt is prefilled whole, less its prefix-cache hit, so it
    /// must fit the largest token count; each step pads to the smallest
    /// bucket that holds it; a sequence's KV for its whole length is
    /// reserved when it is admitted, so nothing is ever preempted (a
    /// recompute could outgrow every compiled shape).
    Compiled(ShapeBuckets),
}

/// What bounds each step and the KV cache the scheduler hands out.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// The token budget of one step.
    pub max_num_batched_tokens: usize,
    /// Most tokens (prompt + output) of one sequence.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub num_blocks: usize,
    /// Reuse cached KV of equal prompt prefixes.
    pub enable_prefix_caching: bool,
    /// The model's end-of-sequence tokens.
    pub eos_token_ids: Vec<TokenId>,
    /// How steps are shaped: mixed, or compiled shapes only.
    pub policy: StepPolicy,
    /// Mixed policy: while sequences decode, prefill chunks are sized so
    /// that a step is predicted to take at most this long (a cost model
    /// fitted to the steps the engine reports). A step with nothing
    /// decoding prefills at the full token budget. `None`: no time limit.
    pub max_step: Option<Duration>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: 2048,
            block_size: inferd_kv::DEFAULT_BLOCK_SIZE,
            num_blocks: 1024,
            enable_prefix_caching: true,
            eos_token_ids: Vec::new(),
            policy: StepPolicy::Mixed,
            max_step: None,
        }
    }
}

impl SchedulerConfig {
    /// Checks that the limits are positive and consistent with each other.
    pub fn validate(&self) -> Result<(), SchedError> {
        let bad = |m: String| Err(SchedError::Config(m));
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.max_step.is_some_and(|d| d.is_zero()) {
            return bad("max_step must be positive (None for no limit)".into());
        }
        if let StepPolicy::Compiled(b) = &self.policy {
            for (name, list) in [("batch_sizes", &b.batch_sizes), ("token_counts", &b.token_counts)] {
                if list.is_empty() || list.contains(&0) || !list.is_sorted_by(|a, b| a < b) {
                    return bad(format!("{name} must be positive and strictly ascending, got {list:?}"));
                }
            }
        }
        Ok(())
    }

    /// The compiled shapes, under the compiled policy.
    pub fn buckets(&self) -> Option<&ShapeBuckets> {
        match &self.policy {
            StepPolicy::Mixed => None,
            StepPolicy::Compiled(b) => Some(b),
        }
    }

    /// Whether steps are sized by time: a `max_step` target under the mixed
    /// policy (the compiled policy's shapes are fixed, so it ignores one).
    pub fn has_step_target(&self) -> bool {
        self.max_step.is_some() && self.policy == StepPolicy::Mixed
    }

    /// The step's token budget, within the largest compiled token count.
    pub fn token_budget(&self) -> usize {
        self.buckets()
            .map_or(self.max_num_batched_tokens, |b| b.max_tokens().min(self.max_num_batched_tokens))
    }

    /// Most sequences per step, within the largest compiled batch.
    pub(crate) fn seq_limit(&self) -> usize {
        self.buckets().map_or(self.max_num_seqs, |b| b.max_batch().min(self.max_num_seqs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_zero_limits_and_unsorted_buckets() {
        let cfg = SchedulerConfig { max_num_seqs: 0, ..Default::default() };
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid scheduler config: max_num_seqs must be positive"
        );
        let cfg = SchedulerConfig {
            policy: StepPolicy::Compiled(ShapeBuckets { batch_sizes: vec![4, 2], token_counts: vec![128] }),
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn buckets_cap_budget_and_batch() {
        let cfg = SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            policy: StepPolicy::Compiled(ShapeBuckets {
                batch_sizes: vec![1, 4, 8],
                token_counts: vec![64, 256],
            }),
            ..Default::default()
        };
        assert_eq!(cfg.token_budget(), 256);
        assert_eq!(cfg.seq_limit(), 8);
        let b = cfg.buckets().unwrap();
        assert_eq!(b.batch_bucket(3), Some(4));
        assert_eq!(b.token_bucket(65), Some(256));
        assert_eq!(b.token_bucket(257), None);
    }
}
