//! The engine without a model: the scheduler, the contract and the engine
//! thread driven over the fake executor, whose tokens depend on the KV it
//! reads back through the block tables (see inferd_exec::fake).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inferd_contract::{PaddedShape, ShapeBuckets};
use inferd_core::{FinishReason, RequestId, SamplingParams, StreamEvent, TokenId};
use inferd_engine::{EngineConfig, EngineCore, EngineHandle, SeqOutput};
use inferd_exec::fake::{FakeLog, fake_generate};
use inferd_exec::{FakeControl, FakeExecutor};
use inferd_sched::SequenceRequest;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::mpsc::error::TryRecvError;

const VOCAB: usize = 500;
const BLOCK: usize = 4;
/// Below the fake's first token, so only stop rules end sequences early.
const EOS: TokenId = 1;
const DEADLINE: Duration = Duration::from_secs(20);

fn config(max_num_seqs: usize, max_num_batched_tokens: usize) -> EngineConfig {
    EngineConfig { max_num_seqs, max_num_batched_tokens, max_model_len: 256, ..Default::default() }
}

fn prompt(len: usize, salt: u32) -> Vec<TokenId> {
    (0..len as u32).map(|i| 20 + (i * 7 + salt * 13) % 400).collect()
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ..Default::default() }
}

fn request(id: u64, prompt: Vec<TokenId>, params: SamplingParams) -> SequenceRequest {
    SequenceRequest::new(RequestId(id), prompt, params)
}

fn lock(log: &Mutex<FakeLog>) -> std::sync::MutexGuard<'_, FakeLog> {
    log.lock().unwrap()
}

/// Steps a core until idle, keeping every output in order.
fn run_all<E: inferd_contract::ModelExecutor>(core: &mut EngineCore<E>) -> Vec<SeqOutput> {
    let mut all = Vec::new();
    let mut guard = 0;
    while core.has_work() {
        all.extend(core.step().unwrap());
        guard += 1;
        assert!(guard < 10_000, "the engine never went idle");
    }
    all
}

fn tokens_of(outputs: &[SeqOutput], id: u64) -> Vec<TokenId> {
    outputs
        .iter()
        .filter(|o| o.id == RequestId(id))
        .filter_map(|o| o.sampled.as_ref().map(|s| s.token))
        .collect()
}

/// Starts the engine thread over `fake` the way the server does.
fn start(fake: FakeExecutor, cfg: EngineConfig) -> (EngineHandle, Arc<FakeControl>, Arc<Mutex<FakeLog>>) {
    let (control, log) = (fake.control(), fake.log());
    let (handle, _join) = EngineHandle::start(move || Ok(fake), cfg, vec![EOS]).unwrap();
    (handle, control, log)
}

fn add(
    handle: &EngineHandle,
    prompt: Vec<TokenId>,
    params: SamplingParams,
) -> (RequestId, UnboundedReceiver<StreamEvent>) {
    let id = handle.next_id();
    let rx = handle.add(request(id.0, prompt, params)).unwrap();
    (id, rx)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every event of a stream up to and including its last one (the channel
/// closes after it).
fn drain(rx: &mut UnboundedReceiver<StreamEvent>) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    let until = Instant::now() + DEADLINE;
    loop {
        match rx.try_recv() {
            Ok(e) => events.push(e),
            Err(TryRecvError::Disconnected) => return events,
            Err(TryRecvError::Empty) => {
                assert!(Instant::now() < until, "stream never ended; got {events:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Reads events until `n` tokens have arrived.
fn wait_tokens(rx: &mut UnboundedReceiver<StreamEvent>, n: usize) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    wait_until("tokens arrive", || {
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        events.iter().filter(|e| matches!(e, StreamEvent::Token { .. })).count() >= n
    });
    events
}

fn stream_tokens(events: &[StreamEvent]) -> Vec<TokenId> {
    events
        .iter()
        .filter_map(|e| if let StreamEvent::Token { token, .. } = e { Some(*token) } else { None })
        .collect()
}

#[test]
fn events_arrive_in_order_and_tokens_follow_the_kv_read_back() {
    // A small budget chunks the long prompts; mixed lengths batch together.
    let (handle, _control, log) = start(FakeExecutor::new(BLOCK, 256, VOCAB, 256), config(8, 16));
    let prompts: Vec<Vec<TokenId>> =
        [3usize, 40, 9, 23, 1, 17].iter().zip(0..).map(|(&n, s)| prompt(n, s)).collect();
    let mut streams: Vec<_> = prompts.iter().map(|p| add(&handle, p.clone(), greedy(10))).collect();
    for ((id, rx), p) in streams.iter_mut().zip(&prompts) {
        let events = drain(rx);
        assert!(
            matches!(events.first(), Some(StreamEvent::Scheduled { cached_prompt_tokens: 0 })),
            "{id}: first event {:?}",
            events.first()
        );
        assert_eq!(stream_tokens(&events), fake_generate(p, 10, VOCAB), "{id}");
        assert_eq!(events.len(), 12, "{id}: scheduled, 10 tokens, finished: {events:?}");
        match events.last() {
            Some(StreamEvent::Finished { reason: FinishReason::Length, usage }) => {
                assert_eq!((usage.prompt_tokens as usize, usage.completion_tokens), (p.len(), 10));
            }
            other => panic!("{id}: last event {other:?}"),
        }
    }
    // A prompt sharing a 32-token prefix with an earlier one reuses its
    // cached blocks: the tokens prove the shared KV is the right one.
    let mut shared = prompts[1][..32].to_vec();
    shared.extend(prompt(5, 99));
    let (_, mut rx) = add(&handle, shared.clone(), greedy(6));
    let events = drain(&mut rx);
    assert!(matches!(events[0], StreamEvent::Scheduled { cached_prompt_tokens: 32 }), "{:?}", events[0]);
    assert_eq!(stream_tokens(&events), fake_generate(&shared, 6, VOCAB));
    assert!(lock(&log).violations.is_empty(), "{:?}", lock(&log).violations);
    assert!(lock(&log).steps.iter().any(|s| s.num_tokens == 16), "the budget was filled by chunks");
}

#[test]
fn a_dropped_receiver_aborts_its_sequence_within_one_step() {
    let (handle, control, log) = start(FakeExecutor::new(BLOCK, 64, VOCAB, 256), config(8, 64));
    control.set_delay(Duration::from_millis(3));
    let (id, mut rx) = add(&handle, prompt(10, 1), greedy(200));
    let (other, mut other_rx) = add(&handle, prompt(6, 2), greedy(200));
    wait_tokens(&mut rx, 3);
    drop(rx);
    let steps_at_drop = lock(&log).steps.len();
    let stats = handle.stats();
    wait_until("its blocks are freed", || stats.num_running.load(std::sync::atomic::Ordering::Relaxed) == 1);
    // Only the step already under way when the receiver went may hold it.
    let seen = lock(&log).steps_with(id);
    assert!(
        seen.iter().all(|&i| i <= steps_at_drop),
        "{id} ran in steps {seen:?} after the drop at {steps_at_drop}"
    );
    // The backend is told it is gone with the next input.
    wait_until("the backend hears of the abort", || {
        lock(&log).steps.iter().any(|s| s.finished.contains(&id))
    });
    // The other stream is untouched and still correct.
    control.set_delay(Duration::ZERO);
    let tokens = stream_tokens(&drain(&mut other_rx));
    assert_eq!(tokens, fake_generate(&prompt(6, 2), 200, VOCAB), "{other}");
    wait_until("all blocks are free", || handle.stats().kv_blocks_used() == 0);
    assert!(lock(&log).violations.is_empty(), "{:?}", lock(&log).violations);
}

#[test]
fn an_executor_error_ends_that_steps_sequences_and_the_engine_serves_on() {
    // Two may run at once, so the third waits outside the failing step.
    let (handle, control, log) = start(FakeExecutor::new(BLOCK, 128, VOCAB, 256), config(2, 64));
    control.set_delay(Duration::from_millis(2));
    let (a, mut rx_a) = add(&handle, prompt(5, 1), greedy(150));
    let (b, mut rx_b) = add(&handle, prompt(7, 2), greedy(150));
    let (c, mut rx_c) = add(&handle, prompt(9, 3), greedy(12));
    wait_tokens(&mut rx_a, 2);
    wait_tokens(&mut rx_b, 1);
    control.fail_next_step();
    for (id, rx) in [(a, &mut rx_a), (b, &mut rx_b)] {
        match drain(rx).last() {
            Some(StreamEvent::Error { message }) => {
                assert!(message.contains("injected failure"), "{id}: {message}")
            }
            other => panic!("{id} should end with an error, got {other:?}"),
        }
    }
    let failed = lock(&log).steps.iter().find(|s| !s.ok).cloned().expect("a failed step");
    assert!(failed.seq_ids.contains(&a) && failed.seq_ids.contains(&b) && !failed.seq_ids.contains(&c));
    // The waiting one and a new one are served, correctly.
    control.set_delay(Duration::ZERO);
    assert_eq!(stream_tokens(&drain(&mut rx_c)), fake_generate(&prompt(9, 3), 12, VOCAB));
    let (_, mut rx_d) = add(&handle, prompt(4, 4), greedy(5));
    let events = drain(&mut rx_d);
    assert!(matches!(events.last(), Some(StreamEvent::Finished { reason: FinishReason::Length, .. })));
    assert_eq!(stream_tokens(&events), fake_generate(&prompt(4, 4), 5, VOCAB));
    wait_until("the failed sequences' blocks are freed", || handle.stats().kv_blocks_used() == 0);
}

#[test]
fn a_lost_backend_ends_what_it_held_restarts_with_backoff_and_serves_the_rest() {
    // The first prompt's full blocks are cached before the worker "dies";
    // the fake forgets every slot then, so a prefix hit on them afterwards
    // would read nothing and be logged as a violation.
    let (handle, control, log) = start(FakeExecutor::new(BLOCK, 128, VOCAB, 256), config(2, 64));
    control.set_delay(Duration::from_millis(2));
    let shared = prompt(12, 1);
    let (a, mut rx_a) = add(&handle, shared.clone(), greedy(150));
    let (b, mut rx_b) = add(&handle, prompt(7, 2), greedy(150));
    let (_, mut rx_c) = add(&handle, shared.clone(), greedy(6));
    wait_tokens(&mut rx_a, 2);
    wait_tokens(&mut rx_b, 1);
    control.failing_restarts.store(2, std::sync::atomic::Ordering::SeqCst);
    control.lose_next_step();
    for (id, rx) in [(a, &mut rx_a), (b, &mut rx_b)] {
        match drain(rx).last() {
            Some(StreamEvent::Error { message }) => {
                assert!(message.contains("lost its state"), "{id}: {message}")
            }
            other => panic!("{id} should end with an error, got {other:?}"),
        }
    }
    let status = handle.stats().backend();
    assert!(
        matches!(status.health, inferd_engine::BackendHealth::Restarting { ref reason } if reason.contains("injected worker death")),
        "{status:?}"
    );
    // Two failed restarts (0.5 s, then 1 s apart), then a good one.
    control.set_delay(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(
        stream_tokens(&drain(&mut rx_c)),
        fake_generate(&shared, 6, VOCAB),
        "the waiting one runs after"
    );
    assert!(started.elapsed() >= Duration::from_millis(1400), "backoff between failed restarts");
    let status = handle.stats().backend();
    assert_eq!((status.health, status.restarts), (inferd_engine::BackendHealth::Up, 1));
    assert_eq!(control.restarts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        lock(&log).violations.is_empty(),
        "no prefix hit on KV the worker lost: {:?}",
        lock(&log).violations
    );
    wait_until("the lost sequences' blocks are freed", || handle.stats().kv_blocks_used() == 0);
}

#[test]
fn a_hardware_error_ends_everything_and_refuses_new_work() {
    let (handle, control, _log) = start(FakeExecutor::new(BLOCK, 128, VOCAB, 256), config(1, 64));
    control.set_delay(Duration::from_millis(2));
    let (_, mut rx_a) = add(&handle, prompt(5, 1), greedy(150));
    let (_, mut rx_b) = add(&handle, prompt(6, 2), greedy(10));
    wait_tokens(&mut rx_a, 1);
    control.hardware_next.store(true, std::sync::atomic::Ordering::SeqCst);
    for rx in [&mut rx_a, &mut rx_b] {
        let events = drain(rx);
        assert!(
            matches!(events.last(), Some(StreamEvent::Error { message }) if message.contains("injected hardware error")),
            "running and waiting sequences both end: {events:?}"
        );
    }
    assert!(matches!(handle.stats().backend().health, inferd_engine::BackendHealth::Failed { .. }));
    let (_, mut rx) = add(&handle, prompt(4, 3), greedy(2));
    match drain(&mut rx).as_slice() {
        [StreamEvent::Error { message }] => assert!(message.contains("takes no more work"), "{message}"),
        other => panic!("a new request is refused, got {other:?}"),
    }
    assert_eq!(control.restarts.load(std::sync::atomic::Ordering::SeqCst), 0, "never restarted");
    assert_eq!(handle.stats().kv_blocks_used(), 0);
}

#[test]
fn shutdown_ends_every_open_stream() {
    let fake = FakeExecutor::new(BLOCK, 128, VOCAB, 256);
    let (control, log) = (fake.control(), fake.log());
    let (handle, join) = EngineHandle::start(move || Ok(fake), config(3, 64), vec![EOS]).unwrap();
    control.set_delay(Duration::from_millis(2));
    let mut streams: Vec<_> = (0..5).map(|i| add(&handle, prompt(6, i), greedy(200)).1).collect();
    wait_tokens(&mut streams[0], 1);
    handle.shutdown();
    for rx in &mut streams {
        let events = drain(rx);
        assert_eq!(events.last(), Some(&StreamEvent::Shutdown), "{events:?}");
    }
    join.join().expect("the engine thread ends cleanly");
    assert!(handle.stats().stopped.load(std::sync::atomic::Ordering::Relaxed));
    assert!(lock(&log).violations.is_empty());
}

#[test]
fn preempted_sequences_resume_by_recompute_with_the_same_tokens() {
    // 14 blocks of 4 tokens; four sequences that each grow to 28 tokens
    // (7 blocks) cannot all stay resident.
    let fake = FakeExecutor::new(BLOCK, 14, VOCAB, 256);
    let log = fake.log();
    let mut core = EngineCore::new(fake, &config(8, 64), vec![EOS]).unwrap();
    for id in 0..4 {
        core.add(request(id, prompt(8, id as u32), greedy(20))).unwrap();
    }
    let outputs = run_all(&mut core);
    assert!(core.stats().num_preemptions > 0, "the tiny cache must force preemption");
    for id in 0..4 {
        assert_eq!(tokens_of(&outputs, id), fake_generate(&prompt(8, id as u32), 20, VOCAB), "seq {id}");
    }
    let log = lock(&log);
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    let preempted: Vec<RequestId> = log.steps.iter().flat_map(|s| s.preempted.clone()).collect();
    assert!(!preempted.is_empty(), "the backend heard of the preemptions");
    for id in (0..4).map(RequestId) {
        let starts = log.steps.iter().filter(|s| s.started.contains(&id)).count();
        assert_eq!(starts, 1, "{id} started once, however often it was preempted");
    }
}

#[test]
fn every_step_fits_a_compiled_shape_bucket() {
    let buckets = ShapeBuckets { batch_sizes: vec![1, 2, 4], token_counts: vec![8, 16, 32] };
    let fake = FakeExecutor::new(BLOCK, 256, VOCAB, 256).with_buckets(buckets.clone());
    let log = fake.log();
    let mut core = EngineCore::new(fake, &config(8, 64), vec![EOS]).unwrap();
    let lens = [3usize, 30, 12, 7, 1, 19, 25];
    for (id, &n) in lens.iter().enumerate() {
        core.add(request(id as u64, prompt(n, id as u32), greedy(6))).unwrap();
    }
    let outputs = run_all(&mut core);
    for (id, &n) in lens.iter().enumerate() {
        assert_eq!(tokens_of(&outputs, id as u64), fake_generate(&prompt(n, id as u32), 6, VOCAB));
    }
    let log = lock(&log);
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    for s in &log.steps {
        let p = s.padded_shape.expect("every step is padded");
        assert!(buckets.contains(p), "{p:?} is not compiled");
        assert!(p.batch >= s.seq_ids.len() && p.tokens >= s.num_tokens);
        // A compiled backend never gets a mixed step: a prefill step holds
        // only sequences starting (whole prompts), a decode step one token each.
        if s.started.is_empty() {
            assert_eq!(s.num_tokens, s.seq_ids.len(), "decode: one token a sequence");
        } else {
            assert_eq!(s.started, s.seq_ids, "prefill: only starting sequences");
        }
    }
    // The 30-token prompt was prefilled whole, in one step of 32.
    assert!(log.steps.iter().any(|s| s.num_tokens == 30 && s.padded_shape.is_some_and(|p| p.tokens == 32)));
    assert!(
        log.steps
            .iter()
            .any(|s| s.started.is_empty() && s.padded_shape == Some(PaddedShape { batch: 4, tokens: 8 }))
    );
}

/// Runs a mixed workload, greedy, some with logprobs and a stop token.
fn mixed_workload(fake: FakeExecutor) -> Vec<SeqOutput> {
    let mut core = EngineCore::new(fake, &config(4, 32), vec![EOS]).unwrap();
    let stop_at = fake_generate(&prompt(6, 2), 3, VOCAB)[2];
    let params = [
        SamplingParams { logprobs: Some(3), ..greedy(8) },
        SamplingParams { stop_token_ids: vec![stop_at], ..greedy(8) },
        greedy(5),
        SamplingParams { logprobs: Some(1), ..greedy(4) },
    ];
    for (id, p) in params.into_iter().enumerate() {
        core.add(request(id as u64 + 1, prompt(4 + 2 * id, id as u32 + 1), p)).unwrap();
    }
    run_all(&mut core)
}

#[test]
fn tokens_sampled_on_the_device_flow_like_sampled_logits() {
    let host = mixed_workload(FakeExecutor::new(BLOCK, 64, VOCAB, 256));
    let device = mixed_workload(FakeExecutor::new(BLOCK, 64, VOCAB, 256).sampling_on_device());
    assert_eq!(host.len(), device.len());
    for (h, d) in host.iter().zip(&device) {
        assert_eq!(
            (h.id, h.finished, h.usage, h.first_scheduled),
            (d.id, d.finished, d.usage, d.first_scheduled)
        );
        let (hs, ds) = (h.sampled.as_ref(), d.sampled.as_ref());
        assert_eq!(hs.map(|s| s.token), ds.map(|s| s.token), "{}", h.id);
        let lp = |s: Option<&inferd_contract::SampledToken>| s.and_then(|s| s.logprobs.clone());
        match (lp(hs), lp(ds)) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                assert_eq!(
                    a.top.iter().map(|l| l.token).collect::<Vec<_>>(),
                    b.top.iter().map(|l| l.token).collect::<Vec<_>>()
                );
                // The host sums 500 exponentials in f32: equal within rounding.
                assert!((a.sampled.logprob - b.sampled.logprob).abs() < 1e-4, "{a:?} vs {b:?}");
            }
            other => panic!("{}: logprobs differ: {other:?}", h.id),
        }
    }
    let finished: HashMap<RequestId, FinishReason> =
        device.iter().filter_map(|o| Some((o.id, o.finished?))).collect();
    assert_eq!(finished[&RequestId(2)], FinishReason::Stop, "the stop token ends it on either path");
    assert_eq!(tokens_of(&device, 2).len(), 3);
    assert!(
        device.iter().any(|o| o
            .sampled
            .as_ref()
            .is_some_and(|s| s.logprobs.as_ref().is_some_and(|l| l.top.len() == 3)))
    );
}

#[test]
fn the_backend_hears_of_every_sequence_once_started_and_once_finished() {
    let fake = FakeExecutor::new(BLOCK, 64, VOCAB, 256);
    let log = fake.log();
    let mut core = EngineCore::new(fake, &config(4, 16), vec![EOS]).unwrap();
    for id in 0..6 {
        core.add(request(id, prompt(3 + id as usize, id as u32), greedy(3))).unwrap();
    }
    // One aborted while waiting never starts, yet is reported finished.
    core.abort(RequestId(5), FinishReason::Abort).unwrap();
    run_all(&mut core);
    // The last finishers are reported with the next step's input.
    core.add(request(9, prompt(2, 9), greedy(1))).unwrap();
    run_all(&mut core);
    let log = lock(&log);
    assert!(log.violations.is_empty(), "{:?}", log.violations);
    for id in (0..6).map(RequestId) {
        let started = log.steps.iter().filter(|s| s.started.contains(&id)).count();
        let finished: Vec<usize> =
            (0..log.steps.len()).filter(|&i| log.steps[i].finished.contains(&id)).collect();
        assert_eq!(started, usize::from(id != RequestId(5)), "{id} started");
        assert_eq!(finished.len(), 1, "{id} reported finished once");
        assert!(
            log.steps_with(id).iter().all(|&i| i < finished[0]),
            "{id} ran after it was reported finished"
        );
    }
}

#[test]
fn a_failing_backend_build_is_reported_not_hung() {
    let err = EngineHandle::start(
        || -> Result<FakeExecutor, _> {
            Err(inferd_contract::ExecError::Unavailable("no such device".into()))
        },
        config(4, 16),
        vec![EOS],
    )
    .map(|_| ())
    .unwrap_err();
    assert!(err.to_string().contains("no such device"), "{err}");
}

/// A test grammar: even tokens only, then after `limit` tokens nothing but
/// EOS; it records every token it is told of.
#[derive(Debug)]
struct EvenThenStop {
    limit: usize,
    seen: Arc<Mutex<Vec<TokenId>>>,
}

impl inferd_core::TokenConstraint for EvenThenStop {
    fn allowed(&mut self, mask: &mut [u32]) -> Result<(), String> {
        mask.fill(0);
        if self.is_finished() {
            inferd_core::mask_allow(mask, EOS);
        } else {
            (2..VOCAB as TokenId).step_by(2).for_each(|t| inferd_core::mask_allow(mask, t));
        }
        Ok(())
    }

    fn consume(&mut self, token: TokenId) -> Result<(), String> {
        self.seen.lock().unwrap().push(token);
        Ok(())
    }

    fn is_finished(&self) -> bool {
        self.seen.lock().unwrap().len() >= self.limit
    }
}

#[test]
fn a_constrained_sequence_samples_only_what_its_grammar_allows_across_preemption() {
    // The tiny cache of the preemption test: sequences are preempted and
    // recomputed while their grammars hold state.
    let fake = FakeExecutor::new(BLOCK, 14, VOCAB, 256);
    let mut core = EngineCore::new(fake, &config(8, 64), vec![EOS]).unwrap();
    let mut seen = Vec::new();
    for id in 0..4 {
        let req = request(id, prompt(8, id as u32), greedy(20));
        if id % 2 == 0 {
            let log = Arc::new(Mutex::new(Vec::new()));
            seen.push((id, log.clone()));
            core.add_constrained(req, Some(Box::new(EvenThenStop { limit: 12, seen: log }))).unwrap();
        } else {
            core.add(req).unwrap();
        }
    }
    let outputs = run_all(&mut core);
    assert!(core.stats().num_preemptions > 0, "the tiny cache must force preemption");
    for (id, log) in seen {
        let tokens = tokens_of(&outputs, id);
        let (body, last) = tokens.split_at(12);
        assert!(body.iter().all(|t| t % 2 == 0), "seq {id}: {tokens:?}");
        assert_eq!(last, [EOS], "seq {id} ends when its grammar does");
        assert_eq!(*log.lock().unwrap(), tokens, "seq {id}: the grammar saw exactly its output, once");
        let end = outputs.iter().find(|o| o.id == RequestId(id) && o.finished.is_some()).unwrap();
        assert_eq!(end.finished, Some(FinishReason::Stop));
    }
    // Rows without a grammar in the same batches are untouched.
    for id in [1, 3] {
        assert_eq!(tokens_of(&outputs, id), fake_generate(&prompt(8, id as u32), 20, VOCAB), "seq {id}");
    }
}

/// Under a step-time target the engine times its steps, and a long prompt
/// that arrives while others decode is prefilled in chunks that keep their
/// steps short; without one it takes the whole budget. The fake sleeps 2 ms
/// a step and 0.2 ms a token, so a 510-token chunk would take about 100 ms.
#[test]
fn a_step_time_target_keeps_a_long_prompt_from_stalling_decodes() {
    let mut chunks = Vec::new();
    for max_step in [None, Some(Duration::from_millis(30))] {
        let exec = FakeExecutor::new(BLOCK, 1024, VOCAB, 2048);
        let control = exec.control();
        control.set_delay(Duration::from_millis(2));
        control.delay_per_token_us.store(200, std::sync::atomic::Ordering::SeqCst);
        let log = exec.log();
        let cfg =
            EngineConfig { max_num_batched_tokens: 512, max_model_len: 2048, max_step, ..config(8, 512) };
        let mut core = EngineCore::new(exec, &cfg, vec![EOS]).unwrap();
        core.add(request(1, prompt(8, 1), greedy(200))).unwrap();
        core.add(request(2, prompt(8, 2), greedy(200))).unwrap();
        for _ in 0..6 {
            core.step().unwrap();
        }
        let before = lock(&log).steps.len();
        core.add(request(3, prompt(1000, 3), greedy(2))).unwrap();
        let mut prefilled = 0;
        while prefilled < 1000 {
            let outs = core.step().unwrap();
            let step = lock(&log).steps.last().cloned().unwrap();
            let decoded = outs.iter().filter(|o| o.id.0 <= 2 && o.sampled.is_some()).count();
            assert_eq!(decoded, 2, "both decodes ran");
            prefilled += step.num_tokens - 2;
        }
        let sizes: Vec<usize> = lock(&log).steps[before..].iter().map(|s| s.num_tokens - 2).collect();
        chunks.push((sizes, core.stats().num_capped_steps));
    }
    let (uncapped, none_capped) = &chunks[0];
    assert_eq!(uncapped[0], 510, "no target: the budget less the two decodes");
    assert_eq!(*none_capped, 0);
    let (capped, num_capped) = &chunks[1];
    // About 130 tokens fit 30 ms; noise on a shared machine only makes
    // steps look slower, so chunks come out smaller, never larger.
    let least = inferd_sched::MIN_PREFILL_CHUNK;
    assert!(capped.iter().all(|&n| (least..=400).contains(&n)), "{capped:?}");
    assert!(capped.len() > uncapped.len(), "{capped:?} vs {uncapped:?}");
    assert!(*num_capped >= 2, "{num_capped}");
}
