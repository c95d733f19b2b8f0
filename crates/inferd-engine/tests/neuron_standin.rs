//! The Neuron backend end to end on any machine: the engine's compiled-shape
//! scheduling and the NeuronExecutor driving the stand-in worker (the CPU
//! model behind the step protocol, holding every step to what a compiled
//! model allows) in a real child process over a real Unix socket.
//!
//! This binary is also the worker: started with `--socket ...` it runs the
//! stand-in (so the tests need no other executable). Without it, it runs
//! its tests (harness = false; a name filter may be given).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inferd_contract::{DType, ExecError, ModelExecutor, ModelInput, ModelOutput, PaddedShape, StartedSeq};
use inferd_core::{RequestId, SamplingParams, StreamEvent, TokenId};
use inferd_engine::{BackendHealth, EngineConfig, EngineCore, EngineHandle};
use inferd_exec::neuron::standin::{COMPILED_FILE, CompiledModel};
use inferd_exec::neuron::{NeuronConfig, NeuronExecutor};
use inferd_exec::{CpuExecutor, CpuExecutorConfig};
use inferd_models::testing::smollm2_path;
use inferd_models::{LoadOptions, WeightFormat, load_weights};
use inferd_sched::SequenceRequest;

const BS: usize = 16;
const VOCAB: usize = 49_152;
const EOS: TokenId = 2;

fn compiled() -> CompiledModel {
    CompiledModel {
        model: "SmolLM2-135M-Instruct (stand-in)".into(),
        kv_layout: inferd_contract::wire::KvLayout::Paged,
        block_size: BS,
        num_blocks: 96,
        max_model_len: 512,
        vocab_size: VOCAB,
        dtype: DType::BF16,
        batch_sizes: vec![1, 2, 4, 8],
        token_counts: vec![16, 32, 64, 128],
        max_top_k: 256,
        tp_degree: 1,
    }
}

/// A compiled-model folder for the stand-in, private to one test.
fn model_dir(name: &str, c: &CompiledModel) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("inferd-standin-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(COMPILED_FILE), serde_json::to_vec_pretty(c).unwrap()).unwrap();
    dir
}

fn neuron_config(dir: &Path, extra: &[&str]) -> NeuronConfig {
    let mut worker = vec![std::env::current_exe().unwrap().display().to_string()];
    worker.extend(extra.iter().map(|s| s.to_string()));
    NeuronConfig {
        worker,
        model_dir: dir.to_path_buf(),
        model_path: smollm2_path(),
        max_model_len: None,
        step_timeout: Duration::from_secs(30),
        load_timeout: Duration::from_secs(60),
    }
}

fn start(name: &str) -> NeuronExecutor {
    NeuronExecutor::start(neuron_config(&model_dir(name, &compiled()), &[])).unwrap()
}

fn cpu() -> CpuExecutor {
    let opts = LoadOptions { format: WeightFormat::Native, max_positions: Some(512), ..Default::default() };
    let model = load_weights(&smollm2_path(), &opts).unwrap();
    let cfg = CpuExecutorConfig {
        block_size: BS,
        kv_cache_memory: 256 << 20,
        kv_dtype: DType::F32,
        max_model_len: 512,
    };
    CpuExecutor::new(model, cfg).unwrap()
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ..Default::default() }
}

fn prompt(len: usize, salt: u32) -> Vec<TokenId> {
    (0..len as u32).map(|i| 300 + (i * 37 + salt * 101) % 20_000).collect()
}

fn engine_config() -> EngineConfig {
    EngineConfig { max_num_seqs: 8, max_num_batched_tokens: 128, max_model_len: 512, ..Default::default() }
}

/// Every request's tokens after running `reqs` to completion on `core`.
fn generate<E: ModelExecutor>(
    core: &mut EngineCore<E>,
    reqs: &[(Vec<TokenId>, SamplingParams)],
) -> Vec<Vec<TokenId>> {
    let first = core.stats().kv.prefix_query_tokens + 1_000;
    for (i, (p, params)) in reqs.iter().enumerate() {
        core.add(SequenceRequest::new(RequestId(first + i as u64), p.clone(), params.clone())).unwrap();
    }
    let out = core.run_to_completion().unwrap();
    (0..reqs.len()).map(|i| out.get(&RequestId(first + i as u64)).cloned().unwrap_or_default()).collect()
}

fn greedy_through_the_stand_in_equals_the_cpu_executor() {
    // Shared prefixes (prefix-cache hits of whole blocks), prompts of many
    // lengths (several buckets), more requests than one step holds, and
    // two seeded samplers with a top-k the device supports.
    let shared = prompt(40, 9);
    let mut first: Vec<(Vec<TokenId>, SamplingParams)> =
        [3, 17, 60, 128].iter().enumerate().map(|(i, &n)| (prompt(n, i as u32), greedy(8))).collect();
    first.push((shared.clone(), greedy(4)));
    for seed in [7, 8] {
        let params = SamplingParams {
            temperature: 0.8,
            top_k: Some(40),
            seed: Some(seed),
            max_tokens: 8,
            ..Default::default()
        };
        first.push((prompt(20, 70), params));
    }
    // A second wave reuses the first's cached prefix.
    let second: Vec<(Vec<TokenId>, SamplingParams)> = (0..3)
        .map(|tail| {
            let mut p = shared.clone();
            p.extend(prompt(5 + tail, 50 + tail as u32));
            (p, greedy(8))
        })
        .collect();
    let mut neuron = EngineCore::new(start("greedy"), &engine_config(), vec![EOS]).unwrap();
    let mut reference = EngineCore::new(cpu(), &engine_config(), vec![EOS]).unwrap();
    for reqs in [&first, &second] {
        let through_worker = generate(&mut neuron, reqs);
        let on_cpu = generate(&mut reference, reqs);
        for (i, (a, b)) in through_worker.iter().zip(&on_cpu).enumerate() {
            assert!(!a.is_empty(), "request {i} produced nothing through the worker");
            assert_eq!(a, b, "request {i} (prompt of {} tokens)", reqs[i].0.len());
        }
    }
    let stats = neuron.stats();
    assert!(stats.kv.prefix_hit_tokens >= 3 * 32, "prefix hits were mapped and checked: {stats:?}");
    assert_eq!(stats.num_preemptions, 0, "compiled steps never preempt");
}

fn seq_input(
    parts: &[(u64, &[TokenId], usize, &[u32])],
    shape: Option<(usize, usize)>,
    started: &[u64],
) -> ModelInput {
    let mut input = ModelInput::new(1);
    for &(id, tokens, start, blocks) in parts {
        input.push_seq(RequestId(id), tokens, start, blocks, BS, true);
    }
    input.padded_shape = shape.map(|(batch, tokens)| PaddedShape { batch, tokens });
    for &id in started {
        let s = parts.iter().find(|p| p.0 == id).unwrap();
        let params = Arc::new(greedy(100));
        input.started.push(StartedSeq { id: RequestId(id), prompt_len: s.1.len() as u32, params });
    }
    input
}

fn tokens_of(out: ModelOutput) -> Vec<TokenId> {
    match out {
        ModelOutput::Sampled(t) => t.into_iter().map(|s| s.token).collect(),
        ModelOutput::Logits(_) => panic!("a Neuron worker samples on its device"),
    }
}

fn cpu_tokens(exec: &mut CpuExecutor, input: &ModelInput) -> Vec<TokenId> {
    let logits = exec.execute(input).unwrap().into_logits().unwrap();
    (0..logits.num_rows()).map(|r| inferd_exec::sampler::argmax(logits.row(r)) as TokenId).collect()
}

fn steps_are_padded_to_compiled_buckets_and_anything_else_is_refused() {
    let mut exec = start("buckets");
    let (a, b, c) = (prompt(5, 1), prompt(7, 2), prompt(9, 3));
    let prefill =
        |shape| seq_input(&[(1, &a, 0, &[0]), (2, &b, 0, &[1]), (3, &c, 0, &[2])], shape, &[1, 2, 3]);
    let refusal = |r: Result<ModelOutput, ExecError>, want: &str| match r {
        Err(ExecError::Input(m)) => assert!(m.contains(want), "{m:?} should say {want:?}"),
        other => panic!("expected a refusal saying {want:?}, got {other:?}"),
    };
    refusal(exec.execute(&prefill(Some((3, 32)))), "not one of the compiled buckets");
    refusal(exec.execute(&prefill(None)), "not one of the compiled buckets");
    let first = tokens_of(exec.execute(&prefill(Some((4, 32)))).unwrap());
    assert_eq!(
        first,
        cpu_tokens(&mut cpu(), &prefill(None)),
        "3 sequences padded to 4x32 compute the same tokens"
    );
    // A step mixing a decode and a new prefill is not a compiled step.
    let mixed = seq_input(&[(1, &[first[0]], 5, &[0]), (4, &a, 0, &[3])], Some((2, 16)), &[4]);
    refusal(exec.execute(&mixed), "mixes them");
    // The worker knows what each sequence holds: a decode at the wrong
    // position passes our own checks but not the worker's.
    let skipping = seq_input(&[(1, &[first[0]], 6, &[0])], Some((1, 16)), &[]);
    refusal(exec.execute(&skipping), "holds 5 tokens");
    // Still serving: decode all three at their next positions, padded to 4x16.
    let decode = seq_input(
        &[(1, &[first[0]], 5, &[0]), (2, &[first[1]], 7, &[1]), (3, &[first[2]], 9, &[2])],
        Some((4, 16)),
        &[],
    );
    assert_eq!(tokens_of(exec.execute(&decode).unwrap()).len(), 3);
}

fn preemption_and_prefix_hits_map_onto_the_workers_blocks() {
    let mut exec = start("mapping");
    let mut reference = cpu();
    let long = prompt(40, 4);
    // Sequence 1 fills blocks 0..3 and decodes once.
    let pre = seq_input(&[(1, &long, 0, &[0, 1, 2])], Some((1, 64)), &[1]);
    let t1 = tokens_of(exec.execute(&pre).unwrap())[0];
    assert_eq!(t1, cpu_tokens(&mut reference, &pre)[0]);
    let dec = seq_input(&[(1, &[t1], 40, &[0, 1, 2])], Some((1, 16)), &[]);
    let t2 = tokens_of(exec.execute(&dec).unwrap())[0];
    // Preempted, then recomputed whole into other blocks: the same next token.
    let mut all = long.clone();
    all.extend([t1, t2]);
    let mut again = seq_input(&[(1, &all[..41], 0, &[5, 6, 7])], Some((1, 64)), &[]);
    again.preempted.push(RequestId(1));
    // Preempted sequences resume without a second `started`.
    let err = exec.execute(&again);
    assert!(
        matches!(err, Err(ExecError::Input(ref m)) if m.contains("reported finished or preempted")),
        "{err:?}"
    );
    let mut gone = seq_input(&[(9, &prompt(3, 8), 0, &[9])], Some((1, 16)), &[9]);
    gone.preempted.push(RequestId(1));
    exec.execute(&gone).unwrap();
    let back = seq_input(&[(1, &all[..41], 0, &[5, 6, 7])], Some((1, 64)), &[]);
    assert_eq!(tokens_of(exec.execute(&back).unwrap())[0], t2, "recomputed into blocks 5..8");
    // A prefix hit: sequence 2 shares the first 32 tokens (blocks 0 and 1)
    // and computes only the rest into its own block 3.
    let mut p2 = long[..32].to_vec();
    p2.extend(prompt(6, 5));
    let hit = seq_input(&[(2, &p2[32..], 32, &[0, 1, 3])], Some((1, 16)), &[2]);
    let whole = seq_input(&[(2, &p2, 0, &[10, 11, 12])], None, &[]);
    assert_eq!(tokens_of(exec.execute(&hit).unwrap()), cpu_tokens(&mut reference, &whole));
    // A hit through blocks never written is refused, not computed on garbage.
    let bad = seq_input(&[(3, &p2[32..], 32, &[20, 21, 22])], Some((1, 16)), &[3]);
    let err = exec.execute(&bad);
    assert!(matches!(err, Err(ExecError::Input(ref m)) if m.contains("cached position 0")), "{err:?}");
}

/// Child processes of this process (the worker, once started).
fn children() -> Vec<u32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    pids
}

fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StreamEvent>) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.try_recv() {
            Ok(e) => events.push(e),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return events,
            Err(_) => {
                assert!(Instant::now() < until, "stream never ended: {events:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn tokens(events: &[StreamEvent]) -> Vec<TokenId> {
    events
        .iter()
        .filter_map(|e| if let StreamEvent::Token { token, .. } = e { Some(*token) } else { None })
        .collect()
}

fn engine_with(name: &str, extra: &[&str], step_timeout: Duration) -> (EngineHandle, PathBuf) {
    let dir = model_dir(name, &compiled());
    let faults = dir.join("fault");
    // SAFETY: set before the worker starts; tests run one after another.
    unsafe { std::env::set_var("INFERD_STANDIN_FAULTS", &faults) };
    let cfg = NeuronConfig { step_timeout, ..neuron_config(&dir, extra) };
    let (handle, _join) =
        EngineHandle::start(move || NeuronExecutor::start(cfg), engine_config(), vec![EOS]).unwrap();
    (handle, faults)
}

/// Starts two long streams and waits for their first tokens.
fn two_streams(handle: &EngineHandle) -> Vec<tokio::sync::mpsc::UnboundedReceiver<StreamEvent>> {
    let mut streams: Vec<_> = (0..2)
        .map(|i| {
            let params = SamplingParams { ignore_eos: true, ..greedy(400) };
            handle.add(SequenceRequest::new(handle.next_id(), prompt(20, 30 + i), params)).unwrap()
        })
        .collect();
    for rx in &mut streams {
        wait_until("a first token", || matches!(rx.try_recv(), Ok(StreamEvent::Token { .. })));
    }
    streams
}

fn ends_with_error(events: &[StreamEvent], want: &str) {
    match events.last() {
        Some(StreamEvent::Error { message }) => {
            assert!(message.contains(want), "{message:?} should say {want:?}")
        }
        other => panic!("the stream should end with an error saying {want:?}, got {other:?}"),
    }
}

/// After a restart: a new request is served with the right tokens.
fn serves_again(handle: &EngineHandle) {
    wait_until("the backend is up again", || handle.stats().backend().health == BackendHealth::Up);
    let p = prompt(12, 77);
    let mut rx = handle.add(SequenceRequest::new(handle.next_id(), p.clone(), greedy(6))).unwrap();
    let got = tokens(&drain(&mut rx));
    let mut reference = EngineCore::new(cpu(), &engine_config(), vec![EOS]).unwrap();
    assert_eq!(
        got,
        generate(&mut reference, &[(p, greedy(6))])[0],
        "the restarted worker computes correctly"
    );
}

fn a_worker_killed_mid_stream_ends_its_streams_and_is_restarted() {
    let before = children();
    let (handle, _) = engine_with("killed", &[], Duration::from_secs(30));
    let worker: Vec<u32> = children().into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(worker.len(), 1, "one worker process");
    let mut streams = two_streams(&handle);
    let status = std::process::Command::new("kill").args(["-9", &worker[0].to_string()]).status().unwrap();
    assert!(status.success());
    for rx in &mut streams {
        // "died during step N" or "exited between steps": where the kill landed.
        ends_with_error(&drain(rx), "(signal: 9 (SIGKILL))");
    }
    serves_again(&handle);
    assert_eq!(handle.stats().backend().restarts, 1);
    assert!(!children().contains(&worker[0]), "the dead worker was reaped");
    wait_until("every block is free", || handle.stats().kv_blocks_used() == 0);
    handle.shutdown();
}

fn a_worker_that_dies_while_idle_is_replaced_before_the_next_request() {
    let before = children();
    let (handle, _) = engine_with("idle", &[], Duration::from_secs(30));
    let worker: Vec<u32> = children().into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(worker.len(), 1, "one worker process");
    assert!(
        std::process::Command::new("kill").args(["-9", &worker[0].to_string()]).status().unwrap().success()
    );
    // No request is needed to notice: the idle engine asks every second.
    wait_until("the idle engine replaced its worker", || handle.stats().backend().restarts == 1);
    serves_again(&handle);
    handle.shutdown();
}

fn a_hung_step_is_detected_and_the_worker_replaced() {
    let (handle, faults) = engine_with("hung", &[], Duration::from_secs(4));
    let mut streams = two_streams(&handle);
    std::fs::write(&faults, "sleep 30000").unwrap();
    let started = Instant::now();
    for rx in &mut streams {
        ends_with_error(&drain(rx), "took longer than 4s");
    }
    assert!(started.elapsed() < Duration::from_secs(15), "not waiting for the hung step");
    serves_again(&handle);
    handle.shutdown();
}

fn a_hardware_error_takes_the_instance_out_of_service() {
    let (handle, faults) = engine_with("hardware", &[], Duration::from_secs(30));
    let mut streams = two_streams(&handle);
    std::fs::write(&faults, "hardware").unwrap();
    for rx in &mut streams {
        ends_with_error(&drain(rx), "status 1202");
    }
    match handle.stats().backend().health {
        BackendHealth::Failed { reason } => assert!(reason.contains("1202"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut rx = handle.add(SequenceRequest::new(handle.next_id(), prompt(4, 1), greedy(2))).unwrap();
    ends_with_error(&drain(&mut rx), "takes no more work");
    handle.shutdown();
}

fn a_worker_of_another_protocol_version_is_refused_at_start() {
    let dir = model_dir("version", &compiled());
    let err = NeuronExecutor::start(neuron_config(&dir, &["--claim-protocol", "0"])).unwrap_err();
    assert_eq!(err.to_string(), "invalid backend config: the worker speaks protocol 0, inferd speaks 1");
    let mut other = compiled();
    other.vocab_size = 1000;
    let err = NeuronExecutor::start(neuron_config(&model_dir("vocab", &other), &[])).unwrap_err();
    assert!(err.to_string().contains("vocabulary of 49152"), "{err}");
    let missing = NeuronConfig { worker: vec!["/no/such/worker".into()], ..neuron_config(&dir, &[]) };
    let err = NeuronExecutor::start(missing).unwrap_err();
    assert!(err.to_string().contains("starting the Neuron worker"), "{err}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--socket") {
        std::process::exit(inferd_exec::neuron::standin::main_with_args(&args));
    }
    let tests: [(&str, fn()); 8] = [
        (
            "greedy_through_the_stand_in_equals_the_cpu_executor",
            greedy_through_the_stand_in_equals_the_cpu_executor,
        ),
        (
            "steps_are_padded_to_compiled_buckets_and_anything_else_is_refused",
            steps_are_padded_to_compiled_buckets_and_anything_else_is_refused,
        ),
        (
            "preemption_and_prefix_hits_map_onto_the_workers_blocks",
            preemption_and_prefix_hits_map_onto_the_workers_blocks,
        ),
        (
            "a_worker_killed_mid_stream_ends_its_streams_and_is_restarted",
            a_worker_killed_mid_stream_ends_its_streams_and_is_restarted,
        ),
        (
            "a_worker_that_dies_while_idle_is_replaced_before_the_next_request",
            a_worker_that_dies_while_idle_is_replaced_before_the_next_request,
        ),
        ("a_hung_step_is_detected_and_the_worker_replaced", a_hung_step_is_detected_and_the_worker_replaced),
        (
            "a_hardware_error_takes_the_instance_out_of_service",
            a_hardware_error_takes_the_instance_out_of_service,
        ),
        (
            "a_worker_of_another_protocol_version_is_refused_at_start",
            a_worker_of_another_protocol_version_is_refused_at_start,
        ),
    ];
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let mut failed = Vec::new();
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        let ok = std::panic::catch_unwind(test).is_ok();
        println!(
            "test {name} ... {} ({:.1}s)",
            if ok { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
        if !ok {
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}
