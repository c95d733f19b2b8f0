use crate::BlockId;
use crate::prefix::ChainLink;

/// The blocks of one sequence, in token order: token `i` lives in
/// `blocks[i / block_size]` at offset `i % block_size`. Only the pool changes
/// a table, so its reference counts stay right.
#[derive(Debug, Default)]
pub struct BlockTable {
    pub(crate) blocks: Vec<BlockId>,
    /// How many leading blocks are registered in the prefix cache.
    pub(crate) num_committed: usize,
    /// The cached block the next committed block chains from.
    pub(crate) chain: Option<ChainLink>,
}

impl BlockTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The blocks, in token order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when the table holds no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Leading blocks already registered in the prefix cache.
    pub fn num_committed(&self) -> usize {
        self.num_committed
    }

    /// The KV slot of the token at `position`.
    pub fn slot(&self, position: usize, block_size: usize) -> Option<usize> {
        let block = self.blocks.get(position / block_size)?;
        Some(block.index() * block_size + position % block_size)
    }
}
