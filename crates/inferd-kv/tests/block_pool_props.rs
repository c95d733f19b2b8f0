//! Property tests for the block pool. Invariants, checked after every step
//! of a random mix of sequences starting, growing, hitting the prefix cache
//! and ending:
//! - free + used = total, and used equals the distinct blocks tables hold;
//! - every block's reference count equals the number of tables holding it;
//! - a prefix hit returns only blocks whose written tokens equal the query;
//! - releasing every table returns the pool to its start state.

use std::collections::HashMap;

use inferd_kv::{BlockId, BlockPool, BlockTable};
use proptest::prelude::*;

const BS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// Start a sequence whose tokens are drawn from a small alphabet so that
    /// prefixes repeat: look up the cache, then allocate and write the rest.
    Start { tokens: Vec<u32> },
    /// Append tokens to a running sequence.
    Extend { which: usize, tokens: Vec<u32> },
    /// End a sequence.
    End { which: usize },
}

fn op() -> impl Strategy<Value = Op> {
    // Prompts share the prefix [0, 0, 0, 0, 1, 1, 1, 1] often.
    let tokens = prop_oneof![
        prop::collection::vec(0u32..3, 1..20),
        prop::collection::vec(0u32..3, 0..12).prop_map(|tail| {
            let mut t = vec![0, 0, 0, 0, 1, 1, 1, 1];
            t.extend(tail);
            t
        }),
    ];
    prop_oneof![
        3 => tokens.prop_map(|tokens| Op::Start { tokens }),
        2 => (any::<usize>(), prop::collection::vec(0u32..3, 1..6))
            .prop_map(|(which, tokens)| Op::Extend { which, tokens }),
        2 => any::<usize>().prop_map(|which| Op::End { which }),
    ]
}

struct Seq {
    tokens: Vec<u32>,
    table: BlockTable,
}

/// What each block holds, as written by the sequence that filled it.
type Written = HashMap<BlockId, Vec<u32>>;

fn write(seq: &Seq, written: &mut Written) {
    for (i, &id) in seq.table.blocks().iter().enumerate() {
        let end = ((i + 1) * BS).min(seq.tokens.len());
        if i * BS < end {
            written.insert(id, seq.tokens[i * BS..end].to_vec());
        }
    }
}

fn check_invariants(pool: &BlockPool, seqs: &[Seq]) {
    let stats = pool.stats();
    assert_eq!(stats.free + stats.used, stats.num_blocks);
    let mut holders: HashMap<BlockId, u32> = HashMap::new();
    for seq in seqs {
        for &id in seq.table.blocks() {
            *holders.entry(id).or_default() += 1;
        }
    }
    assert_eq!(stats.used, holders.len());
    for (&id, &n) in &holders {
        assert_eq!(pool.ref_count(id), n, "refcount of {id:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn pool_invariants_hold(ops in prop::collection::vec(op(), 1..60), num_blocks in 4usize..24) {
        let mut pool = BlockPool::new(num_blocks, BS);
        let mut seqs: Vec<Seq> = Vec::new();
        let mut written = Written::new();
        for op in ops {
            match op {
                Op::Start { tokens } => {
                    let mut table = BlockTable::new();
                    let hit = pool.match_prefix(&mut table, &tokens[..tokens.len() - 1]);
                    prop_assert_eq!(hit % BS, 0);
                    prop_assert!(hit < tokens.len());
                    for (i, id) in table.blocks().iter().enumerate() {
                        prop_assert_eq!(&written[id], &tokens[i * BS..(i + 1) * BS].to_vec(),
                            "prefix hit returned a block with other tokens");
                    }
                    let mut seq = Seq { tokens, table };
                    if pool.grow(&mut seq.table, seq.tokens.len()).is_err() {
                        pool.release(&mut seq.table);
                    } else {
                        write(&seq, &mut written);
                        pool.commit_full_blocks(&mut seq.table, &seq.tokens, seq.tokens.len());
                        seqs.push(seq);
                    }
                }
                Op::Extend { which, tokens } if !seqs.is_empty() => {
                    let n = seqs.len();
                    let seq = &mut seqs[which % n];
                    let new_len = seq.tokens.len() + tokens.len();
                    if pool.grow(&mut seq.table, new_len).is_ok() {
                        seq.tokens.extend(tokens);
                        write(seq, &mut written);
                        pool.commit_full_blocks(&mut seq.table, &seq.tokens, new_len);
                    }
                }
                Op::End { which } if !seqs.is_empty() => {
                    let mut seq = seqs.swap_remove(which % seqs.len());
                    pool.release(&mut seq.table);
                }
                _ => {}
            }
            check_invariants(&pool, &seqs);
        }
        for seq in &mut seqs {
            pool.release(&mut seq.table);
        }
        seqs.clear();
        let stats = pool.stats();
        prop_assert_eq!(stats.free, num_blocks);
        prop_assert_eq!(stats.used, 0);
        // Start state: the whole pool can be taken again.
        let mut all = BlockTable::new();
        prop_assert!(pool.grow(&mut all, num_blocks * BS).is_ok());
        prop_assert_eq!(pool.stats().cached, 0, "taking every block evicts every cached one");
        pool.release(&mut all);
        prop_assert_eq!(pool.stats().free, num_blocks);
    }
}
