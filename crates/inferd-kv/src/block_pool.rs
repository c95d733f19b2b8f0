use std::collections::HashMap;

use inferd_core::TokenId;
use thiserror::Error;

use crate::lru::LruList;
use crate::prefix::{CachedContent, ChainLink};
use crate::{BlockHash, BlockId, BlockTable, blocks_for};

/// Errors of the block pool.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvError {
    #[error("out of KV blocks: need {needed}, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
}

/// A snapshot of the pool's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Blocks no sequence holds (some of them may still be cached).
    pub free: usize,
    /// Blocks held by at least one sequence.
    pub used: usize,
    /// Blocks registered in the prefix cache, held or not.
    pub cached: usize,
    /// Tokens looked up in the prefix cache.
    pub prefix_query_tokens: u64,
    /// Of those, tokens found.
    pub prefix_hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

#[derive(Debug, Default)]
struct Block {
    ref_count: u32,
    /// Bumped on eviction so stale chain links never verify.
    generation: u32,
    cached: Option<CachedContent>,
}

/// Fixed-size KV blocks with reference counts and a prefix cache.
///
/// A free block is either uncached (handed out first) or cached and waiting
/// in least-recently-used order; a cached block is evicted only when no
/// uncached block is left. Allocation, free and eviction are O(1).
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    free_uncached: Vec<BlockId>,
    evictable: LruList,
    by_hash: HashMap<BlockHash, BlockId>,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
    evictions: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        assert!(num_blocks < u32::MAX as usize, "too many blocks");
        BlockPool {
            block_size,
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            // Reversed so that block 0 is handed out first.
            free_uncached: (0..num_blocks as u32).rev().map(BlockId).collect(),
            evictable: LruList::new(num_blocks),
            by_hash: HashMap::new(),
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
            evictions: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that an allocation could take now, evicting cached ones if needed.
    pub fn num_free(&self) -> usize {
        self.free_uncached.len() + self.evictable.len()
    }

    /// The reference count of one block (number of tables holding it).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id.index()].ref_count
    }

    /// Whether `id` is registered in the prefix cache.
    pub fn is_cached(&self, id: BlockId) -> bool {
        self.blocks[id.index()].cached.is_some()
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        let free = self.num_free();
        PoolStats {
            num_blocks: self.blocks.len(),
            block_size: self.block_size,
            free,
            used: self.blocks.len() - free,
            cached: self.by_hash.len(),
            prefix_query_tokens: self.prefix_query_tokens,
            prefix_hit_tokens: self.prefix_hit_tokens,
            evictions: self.evictions,
        }
    }

    /// Takes one free block, evicting the least recently used cached block
    /// only when no uncached block is left.
    fn allocate(&mut self) -> Option<BlockId> {
        let id = match self.free_uncached.pop() {
            Some(id) => id,
            None => {
                let id = BlockId(self.evictable.pop_front()?);
                self.evict(id);
                id
            }
        };
        let block = &mut self.blocks[id.index()];
        debug_assert_eq!(block.ref_count, 0);
        block.ref_count = 1;
        Some(id)
    }

    fn evict(&mut self, id: BlockId) {
        let block = &mut self.blocks[id.index()];
        if let Some(content) = block.cached.take() {
            if self.by_hash.get(&content.hash) == Some(&id) {
                self.by_hash.remove(&content.hash);
            }
            self.evictions += 1;
        }
        block.generation = block.generation.wrapping_add(1);
    }

    /// Adds a reference to a block (a prefix hit), taking it off the eviction list.
    fn retain(&mut self, id: BlockId) {
        if self.blocks[id.index()].ref_count == 0 {
            self.evictable.remove(id.0);
        }
        self.blocks[id.index()].ref_count += 1;
    }

    /// Drops a reference; a block nobody holds becomes free (cached ones at
    /// the most recently used end of the eviction list).
    fn release_one(&mut self, id: BlockId) {
        let block = &mut self.blocks[id.index()];
        assert!(block.ref_count > 0, "block {} released more often than held", id.0);
        block.ref_count -= 1;
        if block.ref_count == 0 {
            if block.cached.is_some() {
                self.evictable.push_back(id.0);
            } else {
                self.free_uncached.push(id);
            }
        }
    }

    /// Fills an empty `table` with the cached blocks that hold a prefix of
    /// `tokens` (full blocks only) and returns how many tokens they cover.
    /// Pass at most `len - 1` prompt tokens: the last one must be computed to
    /// produce logits.
    pub fn match_prefix(&mut self, table: &mut BlockTable, tokens: &[TokenId]) -> usize {
        assert!(table.is_empty(), "match_prefix needs an empty table");
        self.prefix_query_tokens += tokens.len() as u64;
        let mut parent: Option<ChainLink> = None;
        for chunk in tokens.chunks_exact(self.block_size) {
            let hash = BlockHash::chain(parent.map(|p| p.hash), chunk);
            let Some(&id) = self.by_hash.get(&hash) else { break };
            let block = &self.blocks[id.index()];
            let Some(content) = &block.cached else { break };
            let expected_parent = parent.map(|p| (p.block, p.generation));
            if content.parent != expected_parent || &*content.tokens != chunk {
                break;
            }
            let link = ChainLink { block: id, generation: block.generation, hash };
            self.retain(id);
            table.blocks.push(id);
            parent = Some(link);
        }
        table.num_committed = table.blocks.len();
        table.chain = parent;
        let hit = table.blocks.len() * self.block_size;
        self.prefix_hit_tokens += hit as u64;
        hit
    }

    /// Blocks `table` still needs to hold `num_tokens` tokens.
    pub fn blocks_needed(&self, table: &BlockTable, num_tokens: usize) -> usize {
        blocks_for(num_tokens, self.block_size).saturating_sub(table.len())
    }

    /// Grows `table` to hold `num_tokens` tokens, all or nothing.
    pub fn grow(&mut self, table: &mut BlockTable, num_tokens: usize) -> Result<(), KvError> {
        let needed = self.blocks_needed(table, num_tokens);
        if needed > self.num_free() {
            return Err(KvError::OutOfBlocks { needed, free: self.num_free() });
        }
        for _ in 0..needed {
            let id = self.allocate().expect("free count checked above");
            table.blocks.push(id);
        }
        Ok(())
    }

    /// Registers the blocks of `table` that are full of computed tokens in the
    /// prefix cache. `tokens` are the sequence's tokens, the first
    /// `num_computed` of which have their KV written.
    pub fn commit_full_blocks(&mut self, table: &mut BlockTable, tokens: &[TokenId], num_computed: usize) {
        let full = (num_computed.min(tokens.len()) / self.block_size).min(table.len());
        while table.num_committed < full {
            let i = table.num_committed;
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let link = self.commit_one(table.blocks[i], table.chain, chunk);
            table.chain = Some(link);
            table.num_committed += 1;
        }
    }

    /// Registers one full block after `parent` and returns the link that
    /// its successor chains from: this block's, or that of an equal block
    /// already cached (the duplicate then stays uncached).
    fn commit_one(&mut self, id: BlockId, parent: Option<ChainLink>, chunk: &[TokenId]) -> ChainLink {
        let hash = BlockHash::chain(parent.map(|p| p.hash), chunk);
        let parent_key = parent.map(|p| (p.block, p.generation));
        if let Some(&existing) = self.by_hash.get(&hash) {
            let other = &self.blocks[existing.index()];
            let same = other.cached.as_ref().is_some_and(|c| c.parent == parent_key && &*c.tokens == chunk);
            if existing == id || same {
                return ChainLink { block: existing, generation: other.generation, hash };
            }
            // A different prefix with the same hash: keep the cached one and
            // leave this block out; lookups verify, so nothing is confused.
            return ChainLink { block: id, generation: self.blocks[id.index()].generation, hash };
        }
        let block = &mut self.blocks[id.index()];
        debug_assert!(block.cached.is_none());
        block.cached = Some(CachedContent { hash, parent: parent_key, tokens: chunk.into() });
        self.by_hash.insert(hash, id);
        ChainLink { block: id, generation: block.generation, hash }
    }

    /// Forgets every cached prefix: the KV they named is gone (a backend
    /// that lost its state). Free cached blocks become plain free blocks;
    /// held ones stay held, uncached. Returns how many were forgotten.
    pub fn forget_cached(&mut self) -> usize {
        let mut forgotten = 0;
        for i in 0..self.blocks.len() {
            let block = &mut self.blocks[i];
            if block.cached.take().is_none() {
                continue;
            }
            block.generation = block.generation.wrapping_add(1);
            forgotten += 1;
            if block.ref_count == 0 {
                self.evictable.remove(i as u32);
                self.free_uncached.push(BlockId(i as u32));
            }
        }
        self.by_hash.clear();
        forgotten
    }

    /// Returns every block of `table` to the pool, last block first so that
    /// the tail of a chain is evicted before its head.
    pub fn release(&mut self, table: &mut BlockTable) {
        while let Some(id) = table.blocks.pop() {
            self.release_one(id);
        }
        table.num_committed = 0;
        table.chain = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;

    fn seq(n: usize, start: u32) -> Vec<TokenId> {
        (start..start + n as u32).collect()
    }

    #[test]
    fn forgotten_prefixes_never_hit_again() {
        let mut pool = BlockPool::new(4, BS);
        let tokens = seq(9, 0);
        let mut a = BlockTable::new();
        pool.grow(&mut a, 9).unwrap();
        pool.commit_full_blocks(&mut a, &tokens, 9);
        pool.release(&mut a);
        assert_eq!(pool.stats().cached, 2);
        let mut b = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut b, &tokens[..8]), 8, "cached before");
        assert_eq!(pool.forget_cached(), 2);
        assert_eq!(pool.stats().cached, 0);
        pool.release(&mut b);
        assert_eq!(pool.num_free(), 4, "every block is free again");
        let mut c = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut c, &tokens[..8]), 0, "no hit after the KV is gone");
        pool.grow(&mut c, 16).unwrap();
        assert_eq!(pool.num_free(), 0, "forgotten blocks are handed out like any free block");
    }

    #[test]
    fn grow_is_all_or_nothing() {
        let mut pool = BlockPool::new(3, BS);
        let mut a = BlockTable::new();
        pool.grow(&mut a, 9).unwrap();
        assert_eq!(a.len(), 3);
        let mut b = BlockTable::new();
        let err = pool.grow(&mut b, 1).unwrap_err();
        assert_eq!(err, KvError::OutOfBlocks { needed: 1, free: 0 });
        assert_eq!(err.to_string(), "out of KV blocks: need 1, 0 free");
        assert!(b.is_empty());
        pool.release(&mut a);
        assert_eq!(pool.num_free(), 3);
    }

    #[test]
    fn growing_within_capacity_takes_no_block() {
        let mut pool = BlockPool::new(4, BS);
        let mut t = BlockTable::new();
        pool.grow(&mut t, 3).unwrap();
        pool.grow(&mut t, 4).unwrap();
        assert_eq!(t.len(), 1);
        pool.grow(&mut t, 5).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.slot(5, BS), Some(t.blocks()[1].index() * BS + 1));
        assert_eq!(t.slot(8, BS), None);
    }

    #[test]
    fn prefix_hit_returns_committed_blocks_and_counts_tokens() {
        let mut pool = BlockPool::new(8, BS);
        let tokens = seq(10, 100);
        let mut a = BlockTable::new();
        pool.grow(&mut a, tokens.len()).unwrap();
        pool.commit_full_blocks(&mut a, &tokens, 10);
        assert_eq!(a.num_committed(), 2, "only full blocks are committed");
        assert_eq!(pool.stats().cached, 2);

        let mut b = BlockTable::new();
        let hit = pool.match_prefix(&mut b, &tokens[..9]);
        assert_eq!(hit, 8);
        assert_eq!(b.blocks(), &a.blocks()[..2]);
        assert_eq!(pool.ref_count(a.blocks()[0]), 2);
        let stats = pool.stats();
        assert_eq!((stats.prefix_query_tokens, stats.prefix_hit_tokens), (9, 8));
    }

    #[test]
    fn prefix_hit_stops_at_first_differing_block() {
        let mut pool = BlockPool::new(8, BS);
        let tokens = seq(12, 0);
        let mut a = BlockTable::new();
        pool.grow(&mut a, 12).unwrap();
        pool.commit_full_blocks(&mut a, &tokens, 12);
        let mut query = tokens.clone();
        query[5] = 999;
        let mut b = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut b, &query), 4);
        // Same second block after a different first block is no hit either.
        let mut query = tokens.clone();
        query[0] = 999;
        let mut c = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut c, &query), 0);
    }

    #[test]
    fn cached_blocks_outlive_their_sequence_and_are_evicted_last() {
        let mut pool = BlockPool::new(4, BS);
        let tokens = seq(8, 7);
        let mut a = BlockTable::new();
        pool.grow(&mut a, 8).unwrap();
        pool.commit_full_blocks(&mut a, &tokens, 8);
        let cached: Vec<_> = a.blocks().to_vec();
        pool.release(&mut a);
        assert_eq!(pool.stats().free, 4);
        assert_eq!(pool.stats().cached, 2);

        // Two fresh blocks come from the uncached ones; the cache survives.
        let mut b = BlockTable::new();
        pool.grow(&mut b, 8).unwrap();
        assert!(b.blocks().iter().all(|id| !cached.contains(id)));
        assert_eq!(pool.stats().cached, 2);

        // A third block evicts; the chain's tail goes first (released first).
        let mut c = BlockTable::new();
        pool.grow(&mut c, 1).unwrap();
        assert_eq!(c.blocks()[0], cached[1]);
        assert_eq!(pool.stats().cached, 1);
        assert_eq!(pool.stats().evictions, 1);
        let mut d = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut d, &tokens), 4);
    }

    #[test]
    fn a_hit_on_a_free_cached_block_takes_it_off_the_eviction_list() {
        let mut pool = BlockPool::new(2, BS);
        let tokens = seq(4, 0);
        let mut a = BlockTable::new();
        pool.grow(&mut a, 4).unwrap();
        pool.commit_full_blocks(&mut a, &tokens, 4);
        pool.release(&mut a);
        let mut b = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut b, &tokens), 4);
        assert_eq!(pool.num_free(), 1);
        let mut c = BlockTable::new();
        pool.grow(&mut c, 4).unwrap();
        assert!(pool.grow(&mut c, 5).is_err(), "the held cached block must not be evicted");
        assert_ne!(c.blocks()[0], b.blocks()[0]);
    }

    #[test]
    fn evicting_a_canonical_parent_leaves_no_stale_chain() {
        // a and b compute the same first block at once: a's is registered,
        // b's duplicate stays uncached and b's second block chains from a's.
        let mut pool = BlockPool::new(4, BS);
        let tokens = seq(8, 0);
        let (mut a, mut b) = (BlockTable::new(), BlockTable::new());
        pool.grow(&mut a, 4).unwrap();
        pool.grow(&mut b, 8).unwrap();
        pool.commit_full_blocks(&mut a, &tokens[..4], 4);
        pool.commit_full_blocks(&mut b, &tokens, 8);
        let head = a.blocks()[0];
        pool.release(&mut a);
        // The only evictable block is a's head: take it and give it new content.
        let mut c = BlockTable::new();
        pool.grow(&mut c, 8).unwrap();
        assert!(c.blocks().contains(&head));
        let other = seq(8, 50);
        pool.commit_full_blocks(&mut c, &other, 8);
        let c_first = c.blocks()[0];
        pool.release(&mut b);
        pool.release(&mut c);
        // b's second block is still registered, but its parent is gone.
        let mut q = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut q, &tokens), 0);
        let mut mixed = other[..4].to_vec();
        mixed.extend_from_slice(&tokens[4..8]);
        let mut r = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut r, &mixed), 4);
        assert_eq!(r.blocks(), &[c_first]);
    }

    #[test]
    fn duplicate_blocks_chain_through_the_canonical_one() {
        let mut pool = BlockPool::new(8, BS);
        let tokens = seq(8, 0);
        let (mut a, mut b) = (BlockTable::new(), BlockTable::new());
        pool.grow(&mut a, 8).unwrap();
        pool.grow(&mut b, 8).unwrap();
        pool.commit_full_blocks(&mut a, &tokens[..4], 4);
        pool.commit_full_blocks(&mut b, &tokens, 8); // first block duplicates a's
        pool.commit_full_blocks(&mut a, &tokens, 8); // second block duplicates b's
        assert_eq!(pool.stats().cached, 2);
        let mut q = BlockTable::new();
        assert_eq!(pool.match_prefix(&mut q, &tokens), 8);
        assert_eq!(q.blocks(), &[a.blocks()[0], b.blocks()[1]]);
    }
}
