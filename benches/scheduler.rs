//! schedule() + update() in steady decode: every running sequence decodes
//! one token per step. Goal: under 100 µs per step at 512 sequences.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use inferd_benches::decoding_scheduler;

/// Steps run on one scheduler before a fresh one is built (untimed), so the
/// sequences stay at a realistic length.
const STEPS_PER_SCHEDULER: u64 = 256;

fn steady_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler/steady_decode_step");
    for num_seqs in [64usize, 256, 512, 1024] {
        group.bench_with_input(BenchmarkId::from_parameter(num_seqs), &num_seqs, |b, &num_seqs| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let mut s = decoding_scheduler(num_seqs, 128);
                    let sampled = vec![Some(7); num_seqs];
                    let n = (iters - done).min(STEPS_PER_SCHEDULER);
                    let start = Instant::now();
                    for _ in 0..n {
                        let out = s.schedule();
                        let updates = s.update(&out, &sampled).expect("one sample per sequence");
                        std::hint::black_box(updates);
                    }
                    total += start.elapsed();
                    done += n;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, steady_decode);
criterion_main!(benches);
