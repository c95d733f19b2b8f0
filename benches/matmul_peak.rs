//! How close the CPU's matmuls come to what the machine can do.
//!
//! `int8_peak`: a micro-kernel of independent AVX-512 VNNI dot products
//! (`vpdpbusd`, 64 multiply-adds each) held in registers, on every core at
//! once: the machine's int8 multiply-add peak. On a CPU without VNNI it
//! times AVX2's `vpmaddubsw` instead (32 byte products, summed in pairs):
//! the rate of int8 multiplies, which an int8 dot product into 32-bit sums
//! cannot reach on AVX2, since it also needs a widening `vpmaddwd`. `layer_matmuls`: one SmolLM2
//! layer's projections (fused QKV 576→960, output 576→576, fused gate/up
//! 576→3072, down 1536→576) in Q8_0 and in Q4_1 as the CPU executor runs
//! them, at 1, 32 and 512 rows, on inferd's kernels (`INFERD_CPU_MATMUL=candle`
//! runs candle's instead, to compare). `kernel_paths`: the same layer at 32
//! rows in both formats on each of inferd's kernel paths this CPU runs
//! (AVX-512 VNNI, AVX2, scalar). All report multiply-adds as elements, so criterion's `elem/s`
//! divide into the fraction of peak reached. Run with `make bench` (built
//! for this CPU).

use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inferd_cpu::{Isa, PackedMatrix, Pool};
use inferd_models::WeightFormat;
use inferd_models::linear::{FusedLinear, RawWeight, own_cpu_kernels};

/// (in, outs) of each projection in one SmolLM2-135M layer.
const LAYER: [(usize, &[usize]); 4] =
    [(576, &[576, 192, 192]), (576, &[576]), (576, &[1536, 1536]), (1536, &[576])];

fn layer_macs_per_row() -> u64 {
    LAYER.iter().map(|(k, outs)| (k * outs.iter().sum::<usize>()) as u64).sum()
}

/// Multiply-adds one core retires in `iters` rounds of the micro-kernel.
#[cfg(target_arch = "x86_64")]
fn vnni_kernel(iters: u64) -> u64 {
    if !(std::arch::is_x86_feature_detected!("avx512vnni") && std::arch::is_x86_feature_detected!("avx512f"))
    {
        return 0;
    }
    // SAFETY: the features the function needs were detected above.
    unsafe { vnni_rounds(iters) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
fn vnni_rounds(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    const ACCS: usize = 12;
    let a = _mm512_set1_epi8(3);
    let b = _mm512_set1_epi8(5);
    let mut acc = [_mm512_setzero_si512(); ACCS];
    for _ in 0..iters {
        // Twelve independent chains hide the instruction's latency.
        for x in acc.iter_mut() {
            *x = _mm512_dpbusd_epi32(*x, a, b);
        }
    }
    let mut sum = _mm512_setzero_si512();
    for x in acc {
        sum = _mm512_add_epi32(sum, x);
    }
    std::hint::black_box(_mm512_reduce_add_epi32(sum));
    iters * ACCS as u64 * 64
}

/// Multiply-adds one core retires in `iters` rounds of AVX2's `vpmaddubsw`.
#[cfg(target_arch = "x86_64")]
fn maddubs_kernel(iters: u64) -> u64 {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return 0;
    }
    // SAFETY: AVX2 was detected above.
    unsafe { maddubs_rounds(iters) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn maddubs_rounds(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    const ACCS: usize = 12;
    let b = _mm256_set1_epi8(1);
    let mut acc: [__m256i; ACCS] = std::array::from_fn(|i| _mm256_set1_epi8(i as i8));
    for _ in 0..iters {
        // Twelve independent chains, each feeding its result back in.
        for x in acc.iter_mut() {
            *x = _mm256_maddubs_epi16(*x, b);
        }
    }
    let mut sum = _mm256_setzero_si256();
    for x in acc {
        sum = _mm256_add_epi16(sum, x);
    }
    std::hint::black_box(sum);
    iters * ACCS as u64 * 32
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni_kernel(_iters: u64) -> u64 {
    0
}

#[cfg(not(target_arch = "x86_64"))]
fn maddubs_kernel(_iters: u64) -> u64 {
    0
}

fn threads() -> usize {
    std::env::var("INFERD_CPU_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn int8_peak(c: &mut Criterion) {
    const ITERS: u64 = 1 << 20;
    let (name, kernel): (&str, fn(u64) -> u64) = if vnni_kernel(1) > 0 {
        ("vpdpbusd_threads", vnni_kernel)
    } else if maddubs_kernel(1) > 0 {
        ("vpmaddubsw_threads", maddubs_kernel)
    } else {
        eprintln!("int8_peak: this CPU has neither AVX-512 VNNI nor AVX2; skipped");
        return;
    };
    let n = threads();
    let mut group = c.benchmark_group("int8_peak");
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(kernel(ITERS) * n as u64));
    group.bench_function(BenchmarkId::new(name, n), |b| {
        b.iter_custom(|rounds| {
            let start = Instant::now();
            for _ in 0..rounds {
                std::thread::scope(|s| {
                    for _ in 0..n {
                        s.spawn(|| kernel(ITERS));
                    }
                });
            }
            start.elapsed()
        })
    });
    group.finish();
}

fn rand(rows: usize, cols: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|i| {
            (((i as u64).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0) * 0.05
        })
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
}

/// The two quantized formats a layer runs in on the CPU.
const FORMATS: [GgmlDType; 2] = [GgmlDType::Q8_0, GgmlDType::Q4_1];

fn layer_matmuls(c: &mut Criterion) {
    for dtype in FORMATS {
        layer_matmuls_in(c, dtype);
    }
}

fn layer_matmuls_in(c: &mut Criterion, dtype: GgmlDType) {
    let layers: Vec<(usize, FusedLinear)> = LAYER
        .iter()
        .enumerate()
        .map(|(i, &(k, outs))| {
            let parts = outs
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    let w = rand(n, k, (i * 8 + j) as u64);
                    RawWeight::Quantized(QTensor::quantize(&w, dtype).expect("quantize"))
                })
                .collect();
            (k, FusedLinear::new(parts, None, WeightFormat::Native, DType::F32).expect("layer"))
        })
        .collect();
    let kernels = if own_cpu_kernels() { "inferd" } else { "candle" };
    let mut group = c.benchmark_group(format!("layer_matmuls/{dtype:?}/{kernels}").to_lowercase());
    group.sample_size(10);
    for rows in [1usize, 32, 512] {
        let inputs: Vec<Tensor> = layers.iter().map(|(k, _)| rand(rows, *k, 99)).collect();
        group.throughput(Throughput::Elements(layer_macs_per_row() * rows as u64));
        group.bench_with_input(BenchmarkId::new("rows", rows), &inputs, |b, inputs| {
            b.iter(|| {
                for ((_, layer), x) in layers.iter().zip(inputs) {
                    std::hint::black_box(layer.forward(x).expect("matmul"));
                }
            })
        });
    }
    group.finish();
}

fn kernel_paths(c: &mut Criterion) {
    for dtype in FORMATS {
        kernel_paths_in(c, dtype);
    }
}

fn kernel_paths_in(c: &mut Criterion, dtype: GgmlDType) {
    const ROWS: usize = 32;
    let layer: Vec<(usize, PackedMatrix)> = LAYER
        .iter()
        .enumerate()
        .map(|(i, &(k, outs))| {
            let n: usize = outs.iter().sum();
            let q = QTensor::quantize(&rand(n, k, i as u64), dtype).expect("quantize");
            let bytes = q.data().expect("bytes");
            let packed = match dtype {
                GgmlDType::Q8_0 => PackedMatrix::from_q8_0(&bytes, n, k),
                _ => PackedMatrix::from_q4_1(&bytes, n, k),
            };
            (k, packed.expect("pack"))
        })
        .collect();
    let inputs: Vec<Vec<f32>> = layer
        .iter()
        .map(|(k, _)| rand(ROWS, *k, 7).flatten_all().and_then(|t| t.to_vec1()).expect("input"))
        .collect();
    let mut group = c.benchmark_group(format!("kernel_paths/{dtype:?}").to_lowercase());
    group.sample_size(10);
    group.throughput(Throughput::Elements(layer_macs_per_row() * ROWS as u64));
    for isa in Isa::all_supported() {
        group.bench_function(BenchmarkId::new(isa.name(), ROWS), |b| {
            b.iter(|| {
                for ((_, w), x) in layer.iter().zip(&inputs) {
                    std::hint::black_box(w.forward_on(isa, Pool::global(), x, ROWS));
                }
            })
        });
    }
    group.finish();
}

fn pool_round_trip(c: &mut Criterion) {
    let pool = Pool::global();
    let mut group = c.benchmark_group("pool_round_trip");
    group.sample_size(20).measurement_time(Duration::from_secs(2));
    group.bench_function(BenchmarkId::new("threads", pool.threads()), |b| {
        b.iter(|| {
            pool.run(pool.threads(), |p| {
                std::hint::black_box(p);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, int8_peak, layer_matmuls, kernel_paths, pool_round_trip);
criterion_main!(benches);
