//! Prefix-cache keys. A full block's hash chains its parent's hash with its
//! own tokens, so equal hashes mean (almost surely) equal prefixes. The pool
//! never trusts the hash alone: a hit is verified against the block's stored
//! tokens and its parent's identity (block id and generation), which makes a
//! hit exact by induction from the first block.

use inferd_core::TokenId;

use crate::BlockId;

/// The chained hash of a full block: its parent's hash and its own tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// The hash a first block chains from.
const ROOT: u64 = 0x9e37_79b9_7f4a_7c15;

impl BlockHash {
    /// Hash of the block holding `tokens` after `parent` (None for the first block).
    pub fn chain(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
        // FxHash-style mixing: cheap and deterministic across runs.
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut h = parent.map_or(ROOT, |p| p.0);
        for &t in tokens {
            h = (h.rotate_left(5) ^ u64::from(t)).wrapping_mul(K);
        }
        // Final avalanche so nearby token runs spread over the map.
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        BlockHash(h)
    }
}

/// A block's place in a cached chain: the block and the generation it had
/// when its content was registered. A block's generation changes whenever it
/// is evicted, so a stale link never verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainLink {
    pub(crate) block: BlockId,
    pub(crate) generation: u32,
    pub(crate) hash: BlockHash,
}

/// What the prefix cache records for a registered block.
#[derive(Debug, Clone)]
pub(crate) struct CachedContent {
    pub(crate) hash: BlockHash,
    pub(crate) parent: Option<(BlockId, u32)>,
    pub(crate) tokens: Box<[TokenId]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_parent_and_tokens() {
        let a = BlockHash::chain(None, &[1, 2, 3]);
        assert_eq!(a, BlockHash::chain(None, &[1, 2, 3]));
        assert_ne!(a, BlockHash::chain(None, &[1, 2, 4]));
        assert_ne!(a, BlockHash::chain(None, &[3, 2, 1]));
        let child = BlockHash::chain(Some(a), &[5, 6]);
        assert_ne!(child, BlockHash::chain(None, &[5, 6]));
        assert_ne!(child, BlockHash::chain(Some(BlockHash::chain(None, &[9])), &[5, 6]));
    }
}
