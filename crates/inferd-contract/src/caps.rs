use serde::{Deserialize, Serialize};

use crate::{DType, DeviceSpec};

/// Shapes a static-shape backend (Neuron) was compiled for. It runs only
/// these: the engine pads every step to one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeBuckets {
    /// Sequences per step, strictly ascending.
    pub batch_sizes: Vec<usize>,
    /// Packed tokens per step, strictly ascending.
    pub token_counts: Vec<usize>,
}

impl ShapeBuckets {
    /// Checks that both lists are positive and strictly ascending.
    pub fn validate(&self) -> Result<(), String> {
        for (name, list) in [("batch_sizes", &self.batch_sizes), ("token_counts", &self.token_counts)] {
            if list.is_empty() || list.contains(&0) || !list.is_sorted_by(|a, b| a < b) {
                return Err(format!("{name} must be positive and strictly ascending, got {list:?}"));
            }
        }
        Ok(())
    }

    /// True when `shape` is exactly one of the compiled shapes.
    pub fn contains(&self, shape: PaddedShape) -> bool {
        self.batch_sizes.contains(&shape.batch) && self.token_counts.contains(&shape.tokens)
    }
}

/// The compiled shape one step is padded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaddedShape {
    pub batch: usize,
    pub tokens: usize,
}

/// What a backend can run; bounds what the scheduler plans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub device: DeviceSpec,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache, sized from a memory budget at start-up.
    pub num_blocks: usize,
    /// Most tokens one sequence may hold (prompt + output).
    pub max_model_len: usize,
    /// Vocabulary size: the width of a logits row.
    pub vocab_size: usize,
    /// The dtype activations are computed in.
    pub compute_dtype: DType,
    /// Compute dtypes this backend can run.
    pub supported_dtypes: Vec<DType>,
    /// Element type of the KV cache.
    pub kv_dtype: DType,
    /// Compiled shapes, for static-shape backends; `None` runs any shape.
    pub shape_buckets: Option<ShapeBuckets>,
    /// True when `execute` returns sampled tokens rather than logits.
    pub samples_on_device: bool,
}

impl Capabilities {
    /// Tokens the whole KV cache holds.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_validate_and_contain_only_compiled_shapes() {
        let b = ShapeBuckets { batch_sizes: vec![1, 4], token_counts: vec![128, 512] };
        assert!(b.validate().is_ok());
        assert!(b.contains(PaddedShape { batch: 4, tokens: 128 }));
        assert!(!b.contains(PaddedShape { batch: 3, tokens: 128 }), "3 is not compiled");
        let unsorted = ShapeBuckets { batch_sizes: vec![4, 1], token_counts: vec![128] };
        assert!(unsorted.validate().unwrap_err().contains("batch_sizes"));
        let zero = ShapeBuckets { batch_sizes: vec![1], token_counts: vec![0, 8] };
        assert!(zero.validate().unwrap_err().contains("token_counts"));
    }
}
