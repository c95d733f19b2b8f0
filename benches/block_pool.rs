//! BlockPool hot paths: allocating and freeing a sequence's blocks, and
//! prefix lookups against a warm cache of 1,000 blocks.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use inferd_benches::tokens;
use inferd_kv::{BlockPool, BlockTable};
use std::hint::black_box;

const BS: usize = 16;

fn allocate_free(c: &mut Criterion) {
    let mut group = c.benchmark_group("block_pool/allocate_free");
    for blocks in [1usize, 16, 128] {
        let mut pool = BlockPool::new(4096, BS);
        let mut table = BlockTable::new();
        group.bench_with_input(BenchmarkId::from_parameter(blocks), &blocks, |b, &blocks| {
            b.iter(|| {
                pool.grow(&mut table, black_box(blocks * BS)).expect("room");
                pool.release(&mut table);
            })
        });
    }
    group.finish();
}

fn prefix_lookup(c: &mut Criterion) {
    // 1,000 cached blocks: ten prompts of 100 full blocks each.
    let mut pool = BlockPool::new(2048, BS);
    let prompts: Vec<Vec<u32>> = (0..10).map(|i| tokens(100 * BS, i * 1_000_000)).collect();
    for prompt in &prompts {
        let mut table = BlockTable::new();
        pool.grow(&mut table, prompt.len()).expect("room");
        pool.commit_full_blocks(&mut table, prompt, prompt.len());
        pool.release(&mut table);
    }
    assert_eq!(pool.stats().cached, 1000);
    let mut group = c.benchmark_group("block_pool/prefix_lookup_1000_cached");
    for hit_blocks in [0usize, 8, 100] {
        let mut query = prompts[3][..hit_blocks * BS].to_vec();
        query.extend(tokens(4 * BS, 999_000_000));
        let mut table = BlockTable::new();
        group.bench_with_input(BenchmarkId::new("hit_blocks", hit_blocks), &query, |b, query| {
            b.iter(|| {
                let hit = pool.match_prefix(&mut table, black_box(query));
                pool.release(&mut table);
                hit
            })
        });
    }
    group.finish();
}

criterion_group!(benches, allocate_free, prefix_lookup);
criterion_main!(benches);
