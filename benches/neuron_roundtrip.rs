//! What the Neuron backend's process boundary costs: one decode step of the
//! real SmolLM2 at batch 1 and 32, run (a) in process by the CPU executor
//! with a greedy pick of each row, and (b) through the NeuronExecutor and
//! the stand-in worker (padding, the framed JSON protocol over a Unix
//! socket, the stand-in's contract checks, sampling on the worker's side).
//! (b) minus (a) is the whole cost of the boundary; (c) the same through a
//! stand-in that checks every step but skips the model
//! (`INFERD_STANDIN_ECHO=1`) is the protocol round trip alone. Needs
//! models/ (make model).
//!
//! This binary is also the worker: started with `--socket ...` it runs the
//! stand-in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use inferd_contract::{DType, ModelExecutor, ModelInput, ModelOutput, PaddedShape, StartedSeq};
use inferd_core::{RequestId, SamplingParams, TokenId};
use inferd_exec::neuron::standin::{COMPILED_FILE, CompiledModel};
use inferd_exec::neuron::{NeuronConfig, NeuronExecutor};
use inferd_exec::{CpuExecutor, CpuExecutorConfig};
use inferd_models::testing::smollm2_path;
use inferd_models::{LoadOptions, WeightFormat, load_weights};

const BS: usize = 16;
const PROMPT: usize = 16;
const MAX_LEN: usize = 512;
const MAX_BATCH: usize = 32;

fn compiled() -> CompiledModel {
    CompiledModel {
        model: "SmolLM2-135M-Instruct (stand-in)".into(),
        kv_layout: inferd_contract::wire::KvLayout::Paged,
        block_size: BS,
        num_blocks: MAX_BATCH * MAX_LEN / BS,
        max_model_len: MAX_LEN,
        vocab_size: 49_152,
        dtype: DType::BF16,
        batch_sizes: vec![1, MAX_BATCH],
        token_counts: vec![1, PROMPT, MAX_BATCH, MAX_BATCH * PROMPT],
        max_top_k: 256,
        tp_degree: 1,
    }
}

fn standin(echo: bool) -> NeuronExecutor {
    let dir = std::env::temp_dir().join(format!("inferd-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(COMPILED_FILE), serde_json::to_vec(&compiled()).unwrap()).unwrap();
    // SAFETY: set and removed on the bench's only thread, around the
    // worker's start (it inherits the environment then).
    unsafe { std::env::set_var("INFERD_STANDIN_ECHO", if echo { "1" } else { "0" }) };
    let exec = NeuronExecutor::start(NeuronConfig {
        worker: vec![std::env::current_exe().unwrap().display().to_string()],
        model_dir: dir,
        model_path: smollm2_path(),
        max_model_len: None,
        step_timeout: Duration::from_secs(60),
        load_timeout: Duration::from_secs(120),
    })
    .expect("the stand-in starts");
    // SAFETY: as above.
    unsafe { std::env::remove_var("INFERD_STANDIN_ECHO") };
    exec
}

fn cpu() -> CpuExecutor {
    let opts =
        LoadOptions { format: WeightFormat::Native, max_positions: Some(MAX_LEN), ..Default::default() };
    let model = load_weights(&smollm2_path(), &opts).expect("model loads");
    let cfg = CpuExecutorConfig {
        block_size: BS,
        kv_cache_memory: 1 << 30,
        kv_dtype: DType::F32,
        max_model_len: MAX_LEN,
    };
    CpuExecutor::new(model, cfg).expect("cache fits")
}

/// The token each row continues with: the worker's sample, or the CPU's argmax.
fn next_tokens(out: ModelOutput) -> Vec<TokenId> {
    match out {
        ModelOutput::Sampled(t) => t.into_iter().map(|s| s.token).collect(),
        ModelOutput::Logits(l) => {
            (0..l.num_rows()).map(|r| inferd_exec::sampler::argmax(l.row(r)) as TokenId).collect()
        }
    }
}

/// `batch` sequences (ids from `first_id`) decoding one token per step in
/// their own blocks; the first step prefills their prompts.
struct Round {
    ids: Vec<RequestId>,
    last: Vec<TokenId>,
    len: usize,
}

impl Round {
    fn blocks(s: usize) -> Vec<u32> {
        let per = (MAX_LEN / BS) as u32;
        (s as u32 * per..(s as u32 + 1) * per).collect()
    }

    fn start<E: ModelExecutor>(exec: &mut E, batch: usize, first_id: u64, finished: Vec<RequestId>) -> Round {
        let mut input = ModelInput::new(MAX_LEN / BS);
        let params = Arc::new(SamplingParams { temperature: 0.0, ..Default::default() });
        let ids: Vec<RequestId> = (0..batch as u64).map(|i| RequestId(first_id + i)).collect();
        for (s, &id) in ids.iter().enumerate() {
            let prompt: Vec<TokenId> = (0..PROMPT as u32).map(|i| 300 + i * 7 + s as u32).collect();
            input.push_seq(id, &prompt, 0, &Self::blocks(s), BS, true);
            input.started.push(StartedSeq { id, prompt_len: PROMPT as u32, params: params.clone() });
        }
        input.padded_shape = Some(PaddedShape { batch, tokens: batch * PROMPT });
        input.finished = finished;
        let last = next_tokens(exec.execute(&input).expect("prefill"));
        Round { ids, last, len: PROMPT }
    }

    fn decode<E: ModelExecutor>(&mut self, exec: &mut E) {
        let mut input = ModelInput::new(MAX_LEN / BS);
        for (s, &id) in self.ids.iter().enumerate() {
            input.push_seq(id, &[self.last[s]], self.len, &Self::blocks(s), BS, true);
        }
        input.padded_shape = Some(PaddedShape { batch: self.ids.len(), tokens: self.ids.len() });
        self.last = next_tokens(exec.execute(&input).expect("decode"));
        self.len += 1;
    }
}

/// Times `iters` decode steps, starting fresh sequences (untimed) whenever
/// the current ones reach the maximum length.
fn timed<E: ModelExecutor>(exec: &mut E, batch: usize, iters: u64, next_id: &mut u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    let mut finished = Vec::new();
    while left > 0 {
        let mut round = Round::start(exec, batch, *next_id, std::mem::take(&mut finished));
        *next_id += batch as u64;
        let n = left.min((MAX_LEN - PROMPT - 1) as u64);
        let started = Instant::now();
        for _ in 0..n {
            round.decode(exec);
        }
        total += started.elapsed();
        left -= n;
        finished = round.ids;
    }
    total
}

fn roundtrip(c: &mut Criterion) {
    let mut group = c.benchmark_group("neuron_roundtrip");
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    let mut next_id = 1;
    let mut direct = cpu();
    let mut worker = standin(false);
    let mut echo = standin(true);
    for batch in [1, MAX_BATCH] {
        group.bench_function(BenchmarkId::new("protocol_only", batch), |b| {
            b.iter_custom(|iters| timed(&mut echo, batch, iters, &mut next_id))
        });
        group.bench_function(BenchmarkId::new("cpu_in_process", batch), |b| {
            b.iter_custom(|iters| timed(&mut direct, batch, iters, &mut next_id))
        });
        group.bench_function(BenchmarkId::new("standin_worker", batch), |b| {
            b.iter_custom(|iters| timed(&mut worker, batch, iters, &mut next_id))
        });
    }
    group.finish();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--socket") {
        std::process::exit(inferd_exec::neuron::standin::main_with_args(&args));
    }
    let mut c = Criterion::default().configure_from_args();
    roundtrip(&mut c);
    c.final_summary();
}
