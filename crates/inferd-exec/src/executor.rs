use candle_core::Tensor;
use inferd_sched::ShapeBuckets;

use crate::{ExecError, ModelInput};

/// What an executor can run; bounds what the scheduler plans.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache, sized from the memory budget at start-up.
    pub num_blocks: usize,
    /// Most tokens one sequence may hold (prompt + output).
    pub max_model_len: usize,
    /// Vocabulary size: the width of a logits row.
    pub vocab_size: usize,
    /// Compiled shapes, for static-shape backends.
    pub shape_buckets: Option<ShapeBuckets>,
}

/// Logits for the rows of a batch that are sampled.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `(rows, vocab)` f32, in the order of `ModelInput::logits_rows`.
    pub logits: Tensor,
}

/// Runs a model over a packed batch, owning the KV cache.
pub trait ModelExecutor: Send {
    fn capabilities(&self) -> Capabilities;
    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError>;
}
