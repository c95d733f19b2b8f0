//! The paged CPU forward against a plain contiguous reference, and the
//! invariances continuous batching relies on: a sequence's logits do not
//! change when it is batched with others, prefilled in chunks, or recomputed
//! into other blocks after a preemption.

use candle_core::Device;
use inferd_contract::{DType, ModelExecutor, ModelInput};
use inferd_core::RequestId;
use inferd_exec::{CpuExecutor, CpuExecutorConfig, candle_dtype};
use inferd_models::testing::{random_weights, reference_logits, smollm2_path, tiny_config};
use inferd_models::{Llama, LoadOptions, WeightFormat, load_weights};

const BS: usize = 4;

/// One sequence's part of a step: its tokens, how many are cached, how many
/// run now, and its blocks.
struct Part<'a> {
    tokens: &'a [u32],
    computed: usize,
    scheduled: usize,
    blocks: &'a [u32],
}

/// Builds the flat input for `parts`, asking logits for every scheduled row.
fn input(parts: &[Part]) -> ModelInput {
    let mut inp = ModelInput::new(0);
    for (i, p) in parts.iter().enumerate() {
        let tokens = &p.tokens[p.computed..p.computed + p.scheduled];
        inp.push_seq(RequestId(i as u64), tokens, p.computed, p.blocks, BS, true);
    }
    inp.logits_rows = (0..inp.num_tokens() as u32).collect();
    inp
}

fn run(exec: &mut CpuExecutor, parts: &[Part]) -> Vec<Vec<f32>> {
    exec.execute(&input(parts)).unwrap().into_logits().unwrap().to_rows()
}

fn executor(model: Llama, kv_dtype: DType) -> CpuExecutor {
    let cfg = CpuExecutorConfig { block_size: BS, kv_cache_memory: 64 << 20, kv_dtype, max_model_len: 512 };
    CpuExecutor::new(model, cfg).unwrap()
}

fn tiny(format: WeightFormat) -> Llama {
    tiny_in(format, DType::F32)
}

fn tiny_in(format: WeightFormat, dtype: DType) -> Llama {
    let cfg = tiny_config();
    let weights = random_weights(&cfg, 7).unwrap();
    Llama::new(cfg, weights, format, candle_dtype(dtype), 512, &Device::Cpu).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + salt * 11 + 5) % 128).collect()
}

fn blocks(start: u32, n: usize) -> Vec<u32> {
    // Deliberately non-consecutive.
    (0..n as u32).map(|i| start + 3 * i).collect()
}

#[test]
fn paged_forward_equals_contiguous_reference_on_a_tiny_model() {
    for kv in [DType::F32, DType::F16, DType::BF16] {
        let model = tiny(WeightFormat::Dense);
        let tokens = prompt(23, 1);
        let want = reference_logits(&model, &tokens).unwrap();
        let mut exec = executor(model, kv);
        let b = blocks(2, 6);
        let got = run(&mut exec, &[Part { tokens: &tokens, computed: 0, scheduled: 23, blocks: &b }]);
        let tol = match kv {
            DType::F32 => 1e-4,
            DType::F16 => 2e-2,
            DType::BF16 => 1e-1,
        };
        for (g, w) in got.iter().zip(&want) {
            assert!(max_diff(g, w) < tol, "{kv:?}: {}", max_diff(g, w));
        }
    }
}

#[test]
fn logits_do_not_depend_on_batching_chunking_or_recompute() {
    for format in [WeightFormat::Dense, WeightFormat::Q8_0] {
        let a = prompt(21, 1);
        let (b, c) = (prompt(9, 2), prompt(30, 3));
        let (ba, bb, bc) = (blocks(1, 6), blocks(40, 3), blocks(80, 8));

        // a alone, in one pass.
        let mut exec = executor(tiny(format), DType::F32);
        let alone = run(&mut exec, &[Part { tokens: &a, computed: 0, scheduled: 21, blocks: &ba }]);

        // a in chunks of 8, 8, 5, batched with b (one pass) and c (chunked).
        let mut exec = executor(tiny(format), DType::F32);
        let mut batched = Vec::new();
        let step1 = run(
            &mut exec,
            &[
                Part { tokens: &c, computed: 0, scheduled: 10, blocks: &bc },
                Part { tokens: &a, computed: 0, scheduled: 8, blocks: &ba },
                Part { tokens: &b, computed: 0, scheduled: 9, blocks: &bb },
            ],
        );
        batched.extend_from_slice(&step1[10..18]);
        let step2 = run(
            &mut exec,
            &[
                Part { tokens: &a, computed: 8, scheduled: 8, blocks: &ba },
                Part { tokens: &c, computed: 10, scheduled: 20, blocks: &bc },
            ],
        );
        batched.extend_from_slice(&step2[..8]);
        let step3 = run(&mut exec, &[Part { tokens: &a, computed: 16, scheduled: 5, blocks: &ba }]);
        batched.extend(step3);

        // a recomputed after "preemption" into different blocks.
        let moved = blocks(100, 6);
        let recomputed = run(&mut exec, &[Part { tokens: &a, computed: 0, scheduled: 21, blocks: &moved }]);

        let tol = if format == WeightFormat::Dense { 1e-4 } else { 0.0 };
        for (i, row) in alone.iter().enumerate() {
            assert!(
                max_diff(row, &batched[i]) <= tol,
                "{format:?} batched/chunked row {i}: {}",
                max_diff(row, &batched[i])
            );
            assert!(max_diff(row, &recomputed[i]) <= tol, "{format:?} recomputed row {i}");
        }
    }
}

#[test]
fn paged_forward_equals_contiguous_reference_on_smollm2() {
    // f32 compute: quantized matmuls round activations to 8 bits, which turns
    // summation-order noise in attention into visible logit differences.
    let opts = LoadOptions { max_positions: Some(512), format: WeightFormat::Dense, ..Default::default() };
    let model = load_weights(&smollm2_path(), &opts).unwrap();
    let tokens: Vec<u32> = vec![
        1, 4093, 198, 19556, 28, 638, 359, 346, 47, 2, 198, 1, 520, 9531, 198, 504, 3458, 282, 4649, 314,
    ];
    let want = reference_logits(&model, &tokens).unwrap();
    let mut exec = executor(model, DType::F32);
    let b = blocks(3, tokens.len().div_ceil(BS));
    let got = run(&mut exec, &[Part { tokens: &tokens, computed: 0, scheduled: tokens.len(), blocks: &b }]);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(max_diff(g, w) < 1e-3, "row {i}: {}", max_diff(g, w));
    }
}

#[test]
fn half_precision_compute_runs_the_paged_forward_close_to_f32() {
    // The compute dtype reaches the executor: bf16 and f16 activations (and
    // a KV cache in the same dtype) stay close to the f32 reference, and
    // pick the same top token at almost every position.
    let tokens = prompt(23, 4);
    let want = reference_logits(&tiny(WeightFormat::Dense), &tokens).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let model = tiny_in(WeightFormat::Dense, dtype);
        assert_eq!(model.dtype(), candle_dtype(dtype));
        let mut exec = executor(model, dtype);
        assert_eq!(exec.capabilities().compute_dtype, dtype);
        let b = blocks(2, 6);
        let got = run(&mut exec, &[Part { tokens: &tokens, computed: 0, scheduled: 23, blocks: &b }]);
        let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        let argmax = |r: &[f32]| inferd_exec::sampler::argmax(r);
        let same_top = got.iter().zip(&want).filter(|(g, w)| argmax(g) == argmax(w)).count();
        for (g, w) in got.iter().zip(&want) {
            assert!(max_diff(g, w) < 0.05 * scale, "{dtype:?}: {} of scale {scale}", max_diff(g, w));
        }
        assert!(same_top >= 21, "{dtype:?}: same top token at {same_top} of 23 positions");
    }
}
