use inferd_core::TokenId;

use crate::SchedError;

/// Compiled shapes of a static-shape backend (Neuron): the scheduler keeps
/// every step within the largest of each and reports the bucket it fits.
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
    /// Compiled shapes, for backends that only run those.
    pub shape_buckets: Option<ShapeBuckets>,
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
            shape_buckets: None,
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
        if let Some(b) = &self.shape_buckets {
            for (name, list) in [("batch_sizes", &b.batch_sizes), ("token_counts", &b.token_counts)] {
                if list.is_empty() || list.contains(&0) || !list.is_sorted_by(|a, b| a < b) {
                    return bad(format!("{name} must be positive and strictly ascending, got {list:?}"));
                }
            }
        }
        Ok(())
    }

    /// The step's token budget, within the largest compiled token count.
    pub(crate) fn token_budget(&self) -> usize {
        let cap = self.shape_buckets.as_ref().and_then(|b| b.token_counts.last().copied());
        cap.map_or(self.max_num_batched_tokens, |c| c.min(self.max_num_batched_tokens))
    }

    /// Most sequences per step, within the largest compiled batch.
    pub(crate) fn seq_limit(&self) -> usize {
        let cap = self.shape_buckets.as_ref().and_then(|b| b.batch_sizes.last().copied());
        cap.map_or(self.max_num_seqs, |c| c.min(self.max_num_seqs))
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
            shape_buckets: Some(ShapeBuckets { batch_sizes: vec![4, 2], token_counts: vec![128] }),
            ..Default::default()
        };
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn buckets_cap_budget_and_batch() {
        let cfg = SchedulerConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            shape_buckets: Some(ShapeBuckets { batch_sizes: vec![1, 4, 8], token_counts: vec![64, 256] }),
            ..Default::default()
        };
        assert_eq!(cfg.token_budget(), 256);
        assert_eq!(cfg.seq_limit(), 8);
        let b = cfg.shape_buckets.as_ref().unwrap();
        assert_eq!(b.batch_bucket(3), Some(4));
        assert_eq!(b.token_bucket(65), Some(256));
        assert_eq!(b.token_bucket(257), None);
    }
}
