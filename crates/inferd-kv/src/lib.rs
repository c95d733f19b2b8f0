//! Paged KV-cache bookkeeping. The executor stores K and V in fixed-size
//! blocks; this crate decides which block holds which tokens. It never sees a
//! tensor: a [`BlockPool`] hands out [`BlockId`]s with reference counts, a
//! [`BlockTable`] lists one sequence's blocks in order, and full blocks are
//! registered in a prefix cache keyed by a chained hash of their tokens.

mod block_pool;
mod block_table;
mod lru;
mod prefix;

pub use block_pool::{BlockPool, KvError, PoolStats};
pub use block_table::BlockTable;
pub use prefix::BlockHash;

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The opaque handle of one KV block; `id * block_size + offset` is a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// The block's index in the executor's KV tensors.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Blocks needed to hold `num_tokens` tokens.
pub fn blocks_for(num_tokens: usize, block_size: usize) -> usize {
    num_tokens.div_ceil(block_size)
}
