use std::time::Duration;

use inferd_core::{FinishReason, RequestId, SamplingParams, TokenId};

use crate::{
    MIN_PREFILL_CHUNK, NewSeq, SchedError, Scheduler, SchedulerConfig, SchedulerOutput, SeqUpdate,
    SequenceRequest, ShapeBuckets, StepPolicy, StepShape,
};

const EOS: TokenId = 2;

fn config() -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        max_model_len: 256,
        block_size: 4,
        num_blocks: 64,
        enable_prefix_caching: true,
        eos_token_ids: vec![EOS],
        policy: StepPolicy::Mixed,
        max_step: None,
    }
}

fn params(max_tokens: u32) -> SamplingParams {
    SamplingParams { max_tokens, ..Default::default() }
}

fn req(id: u64, prompt: Vec<TokenId>, params: SamplingParams) -> SequenceRequest {
    SequenceRequest::new(RequestId(id), prompt, params)
}

fn prompt(len: usize, start: u32) -> Vec<TokenId> {
    (start..start + len as u32).map(|t| 100 + t).collect()
}

/// Runs one step, sampling `token` for every sequence.
fn step(s: &mut Scheduler, token: TokenId) -> (SchedulerOutput, Vec<SeqUpdate>) {
    let out = s.schedule();
    let sampled = vec![Some(token); out.num_seqs()];
    let updates = s.update(&out, &sampled).unwrap();
    (out, updates)
}

#[test]
fn add_refuses_requests_that_can_never_run() {
    let mut s = Scheduler::new(config()).unwrap();
    assert_eq!(s.add(req(1, vec![], params(4))), Err(SchedError::EmptyPrompt));
    let err = s.add(req(1, prompt(250, 0), params(10))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "this model's maximum context length is 256 tokens, but the prompt has 250 tokens and max_tokens is 10"
    );
    s.add(req(1, prompt(4, 0), params(4))).unwrap();
    assert_eq!(s.add(req(1, prompt(4, 0), params(4))), Err(SchedError::DuplicateId(RequestId(1))));
    let mut small = Scheduler::new(SchedulerConfig { num_blocks: 2, ..config() }).unwrap();
    assert_eq!(
        small.add(req(2, prompt(8, 0), params(4))),
        Err(SchedError::NeverFits { needed: 3, total: 2 })
    );
}

#[test]
fn long_prompt_is_prefilled_in_chunks_and_samples_only_at_the_end() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: 32, ..config() }).unwrap();
    s.add(req(1, prompt(100, 0), params(3))).unwrap();
    let mut chunks = Vec::new();
    let mut tokens_seen = Vec::new();
    for _ in 0..4 {
        let (out, updates) = step(&mut s, 7);
        chunks.push(out.num_scheduled_tokens);
        tokens_seen.push(updates[0].token);
    }
    assert_eq!(chunks, [32, 32, 32, 4]);
    assert_eq!(tokens_seen, [None, None, None, Some(7)]);
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.num_scheduled_tokens, 1, "decode schedules one token");
}

#[test]
fn running_sequences_take_the_budget_before_waiting_ones() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: 10, ..config() }).unwrap();
    s.add(req(1, prompt(8, 0), params(10))).unwrap();
    step(&mut s, 7); // 1 prefills fully
    s.add(req(2, prompt(20, 50), params(10))).unwrap();
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.running_seqs.len(), 1);
    assert_eq!(out.running_seqs[0].num_scheduled_tokens, 1);
    assert_eq!(out.new_seqs[0].num_scheduled_tokens, 9, "the waiting one gets what is left");
    assert_eq!(out.num_scheduled_tokens, 10);
}

#[test]
fn new_sequences_carry_full_data_and_running_ones_only_changes() {
    let mut s = Scheduler::new(config()).unwrap();
    s.add(req(1, prompt(7, 0), params(10))).unwrap();
    let out = s.schedule();
    assert_eq!(
        out.new_seqs,
        [NewSeq { id: RequestId(1), num_computed_tokens: 0, num_scheduled_tokens: 7, first_time: true }]
    );
    // The output names the sequence; its data stays with the scheduler.
    let seq = s.get(RequestId(1)).unwrap();
    assert_eq!(seq.tokens(), prompt(7, 0));
    assert_eq!(seq.block_table.len(), 2);
    s.update(&out, &[Some(7)]).unwrap();
    // 8 tokens now: the next decode fills block 2 without a new block.
    let (second, _) = step(&mut s, 7);
    assert!(second.new_seqs.is_empty());
    assert_eq!(second.running_seqs[0].num_computed_tokens, 7);
    assert_eq!(s.get(RequestId(1)).unwrap().block_table.len(), 2);
    // The 9th token needs a third block.
    step(&mut s, 7);
    assert_eq!(s.get(RequestId(1)).unwrap().block_table.len(), 3);
}

#[test]
fn prefix_cache_hits_count_as_computed_tokens() {
    let mut s = Scheduler::new(config()).unwrap();
    let shared = prompt(12, 0);
    s.add(req(1, shared.clone(), params(1))).unwrap();
    let (_, updates) = step(&mut s, 7);
    assert_eq!(updates[0].finished, Some(FinishReason::Length));
    let mut longer = shared.clone();
    longer.extend(prompt(3, 90));
    s.add(req(2, longer, params(1))).unwrap();
    let (out, updates) = step(&mut s, 7);
    assert_eq!(out.new_seqs[0].num_computed_tokens, 12);
    assert_eq!(out.new_seqs[0].num_scheduled_tokens, 3);
    assert_eq!(updates[0].usage.cached_prompt_tokens, 12);
    // A fully cached prompt still computes its last token.
    s.add(req(3, shared, params(1))).unwrap();
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.new_seqs[0].num_computed_tokens, 8);
    assert_eq!(out.new_seqs[0].num_scheduled_tokens, 4);
    let stats = s.stats().kv;
    assert!(stats.prefix_hit_tokens >= 20);
}

#[test]
fn out_of_blocks_preempts_the_most_recent_by_recompute() {
    // 6 blocks of 4 tokens: two 8-token prompts take 4 blocks; growth evicts.
    let mut s =
        Scheduler::new(SchedulerConfig { num_blocks: 6, enable_prefix_caching: false, ..config() }).unwrap();
    s.add(req(1, prompt(8, 0), params(12))).unwrap();
    s.add(req(2, prompt(8, 50), params(12))).unwrap();
    step(&mut s, 7); // both prefill; 2 blocks each
    let mut preempted = None;
    for _ in 0..8 {
        let (out, _) = step(&mut s, 7);
        if !out.preempted_ids.is_empty() {
            preempted = Some(out);
            break;
        }
    }
    let out = preempted.expect("growth must preempt");
    assert_eq!(out.preempted_ids, [RequestId(2)], "the most recently admitted goes");
    assert_eq!(out.running_seqs.len(), 1);
    assert!(out.new_seqs.is_empty(), "no admission in a step that preempted");
    let victim = s.get(RequestId(2)).unwrap();
    assert!(victim.block_table.is_empty());
    assert_eq!(victim.num_computed_tokens, 0);
    let generated = victim.output().to_vec();
    assert!(!generated.is_empty());
    // Run 1 to completion; 2 comes back as a new sequence with its output.
    let mut resumed = None;
    for _ in 0..20 {
        let (out, _) = step(&mut s, 7);
        if let Some(new) = out.new_seqs.iter().find(|n| n.id == RequestId(2)) {
            resumed = Some(new.clone());
            break;
        }
    }
    let resumed = resumed.expect("preempted sequence must resume");
    assert!(!resumed.first_time);
    let seq = s.get(RequestId(2)).unwrap();
    assert!(seq.num_tokens() >= 8 + generated.len(), "it keeps the output it had");
    assert_eq!(&seq.output()[..generated.len()], generated);
}

#[test]
fn preempted_sequence_goes_back_to_the_front_of_the_queue() {
    let mut s =
        Scheduler::new(SchedulerConfig { num_blocks: 6, enable_prefix_caching: false, ..config() }).unwrap();
    s.add(req(1, prompt(8, 0), params(12))).unwrap();
    s.add(req(2, prompt(8, 50), params(12))).unwrap();
    step(&mut s, 7);
    s.add(req(3, prompt(4, 80), params(1))).unwrap();
    loop {
        let (out, _) = step(&mut s, 7);
        if !out.preempted_ids.is_empty() {
            break;
        }
    }
    // 2 arrived before 3, so it is admitted first when room returns.
    let mut order = Vec::new();
    for _ in 0..30 {
        let (out, _) = step(&mut s, 7);
        order.extend(out.new_seqs.iter().map(|n| n.id));
    }
    assert_eq!(order.first(), Some(&RequestId(2)));
}

#[test]
fn finishes_on_eos_stop_ids_and_max_tokens_but_never_before_min_tokens() {
    let mut s = Scheduler::new(config()).unwrap();
    s.add(req(1, prompt(4, 0), params(5))).unwrap();
    s.add(req(2, prompt(4, 0), SamplingParams { stop_token_ids: vec![9], ..params(5) })).unwrap();
    s.add(req(3, prompt(4, 0), SamplingParams { min_tokens: 2, ..params(5) })).unwrap();
    s.add(req(4, prompt(4, 0), SamplingParams { ignore_eos: true, ..params(3) })).unwrap();
    let out = s.schedule();
    let updates = s.update(&out, &[Some(EOS), Some(9), Some(EOS), Some(EOS)]).unwrap();
    let finished: Vec<_> = updates.iter().map(|u| u.finished).collect();
    assert_eq!(finished, [Some(FinishReason::Stop), Some(FinishReason::Stop), None, None]);
    let (_, updates) = step(&mut s, EOS);
    assert_eq!(updates[0].finished, Some(FinishReason::Stop), "min_tokens reached");
    assert_eq!(updates[1].finished, None, "ignore_eos");
    let (_, updates) = step(&mut s, EOS);
    assert_eq!(updates[0].finished, Some(FinishReason::Length));
    assert_eq!(updates[0].usage.completion_tokens, 3);
    assert!(!s.has_work());
}

#[test]
fn max_model_len_ends_a_sequence_with_length() {
    let mut s = Scheduler::new(SchedulerConfig { max_model_len: 10, ..config() }).unwrap();
    s.add(req(1, prompt(6, 0), params(4))).unwrap();
    let mut last = None;
    for _ in 0..4 {
        let (_, updates) = step(&mut s, 7);
        last = updates[0].finished;
    }
    assert_eq!(last, Some(FinishReason::Length));
    assert!(!s.has_work());
}

#[test]
fn finished_and_aborted_sequences_free_blocks_and_keep_full_blocks_cached() {
    let mut s = Scheduler::new(config()).unwrap();
    s.add(req(1, prompt(9, 0), params(1))).unwrap();
    s.add(req(2, prompt(9, 30), params(50))).unwrap();
    step(&mut s, 7);
    assert!(s.abort(RequestId(2), FinishReason::Abort).is_some());
    assert!(s.abort(RequestId(2), FinishReason::Abort).is_none());
    let stats = s.stats();
    assert_eq!(stats.kv.free, stats.kv.num_blocks);
    assert_eq!(stats.kv.cached, 4, "two full blocks of each prompt stay cached");
    let out = s.schedule();
    assert_eq!(out.finished_ids, [RequestId(1), RequestId(2)]);
    assert!(s.schedule().finished_ids.is_empty(), "reported once");
}

#[test]
fn aborting_a_waiting_sequence_removes_it_from_the_queue() {
    let mut s = Scheduler::new(config()).unwrap();
    s.add(req(1, prompt(4, 0), params(4))).unwrap();
    s.abort(RequestId(1), FinishReason::Abort).unwrap();
    assert_eq!(s.stats().num_waiting, 0);
    assert!(s.schedule().is_empty());
}

#[test]
fn running_is_capped_at_max_num_seqs() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 3, ..config() }).unwrap();
    for id in 0..5 {
        s.add(req(id, prompt(2, id as u32 * 10), params(10))).unwrap();
    }
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.num_seqs(), 3);
    assert_eq!(s.stats().num_waiting, 2);
}

#[test]
fn higher_priority_waits_less() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 1, ..config() }).unwrap();
    s.add(req(1, prompt(2, 0), params(1))).unwrap();
    s.add(SequenceRequest { priority: 5, ..req(2, prompt(2, 10), params(1)) }).unwrap();
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.new_seqs[0].id, RequestId(2));
}

fn compiled(batch_sizes: Vec<usize>, token_counts: Vec<usize>) -> SchedulerConfig {
    SchedulerConfig { policy: StepPolicy::Compiled(ShapeBuckets { batch_sizes, token_counts }), ..config() }
}

#[test]
fn compiled_steps_are_whole_prefills_or_decodes_padded_to_a_bucket() {
    let mut s = Scheduler::new(compiled(vec![1, 2, 4], vec![8, 16])).unwrap();
    // Prompts of 3, 7, 10 and 3 tokens; the largest step holds 16.
    for (id, len) in [(0, 3), (1, 7), (2, 10), (3, 3)] {
        s.add(req(id, prompt(len, id as u32 * 20), params(4))).unwrap();
    }
    let (out, _) = step(&mut s, 7);
    // 3 + 7 fit; 10 more would not, and a prompt is never split.
    assert_eq!(out.new_seqs.iter().map(|n| n.num_scheduled_tokens).collect::<Vec<_>>(), [3, 7]);
    assert!(out.running_seqs.is_empty());
    assert_eq!(out.padded_shape.map(|p| (p.batch, p.tokens)), Some((2, 16)));
    // Someone still waits and fits: another prefill, not a decode.
    let (out, _) = step(&mut s, 7);
    assert_eq!(
        out.new_seqs.iter().map(|n| (n.id.0, n.num_scheduled_tokens)).collect::<Vec<_>>(),
        [(2, 10), (3, 3)]
    );
    assert!(out.running_seqs.is_empty(), "never a mixed step");
    assert_eq!(out.padded_shape.map(|p| (p.batch, p.tokens)), Some((2, 16)));
    // Nobody waits: a decode of all four, one token each.
    let (out, _) = step(&mut s, 7);
    assert!(out.new_seqs.is_empty());
    assert_eq!(out.running_seqs.len(), 4);
    assert!(out.running_seqs.iter().all(|r| r.num_scheduled_tokens == 1));
    assert_eq!(out.padded_shape.map(|p| (p.batch, p.tokens)), Some((4, 8)));
}

#[test]
fn compiled_refuses_prompts_no_step_can_hold_and_keeps_the_batch_limit() {
    let mut s = Scheduler::new(compiled(vec![1, 2], vec![8, 16])).unwrap();
    assert_eq!(
        s.add(req(1, prompt(17, 0), params(4))),
        Err(SchedError::PromptOverCompiled { prompt_tokens: 17, max_prompt_tokens: 16 })
    );
    for id in 0..3 {
        s.add(req(id, prompt(2, id as u32 * 10), params(3))).unwrap();
    }
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.num_seqs(), 2, "the largest compiled batch");
    let (out, _) = step(&mut s, 7);
    assert_eq!((out.new_seqs.len(), out.running_seqs.len()), (0, 2), "full: decode");
}

#[test]
fn compiled_reserves_kv_for_the_whole_length_and_never_preempts() {
    // 8 blocks of 4 tokens. Each request may reach 4 + 12 = 16 tokens, so
    // reserving 15 tokens (4 blocks) for each admits two at a time.
    let cfg =
        SchedulerConfig { num_blocks: 8, enable_prefix_caching: false, ..compiled(vec![1, 2, 4], vec![16]) };
    let mut s = Scheduler::new(cfg).unwrap();
    for id in 0..3 {
        s.add(req(id, prompt(4, id as u32 * 10), params(12))).unwrap();
    }
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.new_seqs.len(), 2, "the third's whole length does not fit beside them");
    assert_eq!(s.stats().kv.free, 0);
    // Eleven decodes to finish both; the third waits, nothing is preempted.
    let mut finished = 0;
    for _ in 0..11 {
        let (out, updates) = step(&mut s, 7);
        assert!(out.preempted_ids.is_empty() && out.new_seqs.is_empty());
        finished += updates.iter().filter(|u| u.finished.is_some()).count();
    }
    assert_eq!(finished, 2);
    let (out, _) = step(&mut s, 7);
    assert_eq!(
        out.new_seqs.iter().map(|n| n.id.0).collect::<Vec<_>>(),
        [2],
        "admitted once blocks came back"
    );
}

#[test]
fn compiled_prefills_only_what_the_prefix_cache_lacks() {
    let mut s = Scheduler::new(compiled(vec![1, 2], vec![8, 16])).unwrap();
    s.add(req(1, prompt(12, 0), params(2))).unwrap();
    step(&mut s, 7);
    step(&mut s, 7);
    // Same 12-token prompt: two full blocks (8 tokens) come from the cache.
    s.add(req(2, prompt(12, 0), params(2))).unwrap();
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.new_seqs[0].num_computed_tokens, 8);
    assert_eq!(out.new_seqs[0].num_scheduled_tokens, 4);
    assert_eq!(out.padded_shape.map(|p| (p.batch, p.tokens)), Some((1, 8)));
}

#[test]
fn update_checks_its_samples() {
    let mut s = Scheduler::new(config()).unwrap();
    s.add(req(1, prompt(4, 0), params(4))).unwrap();
    let out = s.schedule();
    assert_eq!(s.update(&out, &[]), Err(SchedError::SampleCount { got: 0, expected: 1 }));
    assert_eq!(s.update(&out, &[None]), Err(SchedError::MissingSample(RequestId(1))));
}

#[test]
fn a_lost_backend_ends_running_sequences_keeps_waiting_ones_and_forgets_prefixes() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 1, ..config() }).unwrap();
    let shared = prompt(12, 0);
    s.add(req(1, shared.clone(), params(8))).unwrap();
    step(&mut s, 7);
    s.add(req(2, shared.clone(), params(8))).unwrap();
    assert_eq!(s.stats().num_running, 1);
    assert!(s.stats().kv.cached > 0, "the prompt's full blocks are cached");
    let ended = s.backend_lost(FinishReason::Error);
    assert_eq!(ended.iter().map(|q| q.id).collect::<Vec<_>>(), [RequestId(1)]);
    let stats = s.stats();
    assert_eq!((stats.num_running, stats.num_waiting, stats.kv.cached), (0, 1, 0));
    assert_eq!(stats.kv.free, stats.kv.num_blocks, "every block is free");
    let (out, _) = step(&mut s, 7);
    assert_eq!(out.new_seqs[0].num_computed_tokens, 0, "no prefix hit on KV that is gone");
}

/// A simulated machine: 5 ms a step, 2 ms a token, 0.3 ms a sequence and
/// 0.2 µs per attended (query, key) pair (about SmolLM2's ratio of
/// attention to matmul work).
fn machine_ms(shape: StepShape) -> f64 {
    5.0 + 2.0 * shape.tokens as f64 + 0.3 * shape.seqs as f64 + 2e-4 * shape.attention
}

/// Runs one step and reports its simulated time to the scheduler.
fn timed_step(s: &mut Scheduler) -> (SchedulerOutput, f64) {
    let out = s.schedule();
    let ms = machine_ms(StepShape::of(&out));
    s.observe_step(&out, Duration::from_secs_f64(ms / 1e3));
    let sampled = vec![Some(7); out.num_seqs()];
    s.update(&out, &sampled).unwrap();
    (out, ms)
}

fn timed_config(max_step_ms: u64) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 512,
        max_model_len: 4096,
        block_size: 16,
        num_blocks: 1024,
        max_step: Some(Duration::from_millis(max_step_ms)),
        ..config()
    }
}

/// Tokens scheduled for `id` this step.
fn scheduled(out: &SchedulerOutput, id: u64) -> usize {
    out.batch().find(|&(i, _)| i == RequestId(id)).map_or(0, |(_, n)| n)
}

#[test]
fn a_step_time_target_cuts_prefill_beside_decodes_but_not_a_lone_prompt() {
    let mut s = Scheduler::new(timed_config(100)).unwrap();
    // A lone long prompt prefills at the full budget: nothing decodes.
    s.add(req(1, prompt(1200, 0), params(300))).unwrap();
    let (out, _) = timed_step(&mut s);
    assert_eq!(scheduled(&out, 1), 512);
    let (out, _) = timed_step(&mut s);
    assert_eq!(scheduled(&out, 1), 512, "still nothing decoding");
    let (out, _) = timed_step(&mut s);
    assert_eq!(scheduled(&out, 1), 176, "the rest of the prompt");
    // Now it decodes; a few more short prompts join it and decode too.
    for id in 2..5 {
        s.add(req(id, prompt(20, 1000 * id as u32), params(300))).unwrap();
    }
    for _ in 0..6 {
        timed_step(&mut s);
    }
    assert!(s.cost_model().observations() >= 6);
    // A 1,000-token prompt arrives while four sequences decode: each step
    // keeps within the target, the decodes run every step, and the prompt
    // progresses every step until it is prefilled.
    s.add(req(9, prompt(1000, 50_000), params(4))).unwrap();
    let mut prefilled = 0;
    let mut steps = 0;
    while prefilled < 1000 {
        let (out, ms) = timed_step(&mut s);
        let n = scheduled(&out, 9);
        assert!(n >= MIN_PREFILL_CHUNK, "the prompt progresses every step, got {n}");
        assert!(ms <= 100.5, "step of {ms:.1} ms with a chunk of {n}");
        for id in 1..5 {
            assert_eq!(scheduled(&out, id), 1, "sequence {id} decodes every step");
        }
        prefilled += n;
        steps += 1;
    }
    assert_eq!(prefilled, 1000);
    // Within the target, but not needlessly small: about 40 tokens a step.
    assert!((15..=40).contains(&steps), "{steps} steps");
    assert_eq!(s.stats().num_capped_steps, steps as u64 - 1, "the last chunk fitted whole");
}

#[test]
fn prefill_progresses_even_when_the_decodes_alone_fill_the_target() {
    let mut s = Scheduler::new(timed_config(1)).unwrap();
    for id in 1..4 {
        s.add(req(id, prompt(8, 100 * id as u32), params(100))).unwrap();
    }
    for _ in 0..5 {
        timed_step(&mut s);
    }
    s.add(req(9, prompt(200, 9000), params(4))).unwrap();
    let steps = 200usize.div_ceil(MIN_PREFILL_CHUNK);
    let chunks: Vec<usize> = (0..steps).map(|_| scheduled(&timed_step(&mut s).0, 9)).collect();
    let mut want = vec![MIN_PREFILL_CHUNK; 200 / MIN_PREFILL_CHUNK];
    want.push(200 % MIN_PREFILL_CHUNK);
    want.retain(|&n| n > 0);
    assert_eq!(chunks, want, "the minimum chunk, every step");
}

#[test]
fn without_a_target_or_a_fitted_model_the_budget_alone_decides() {
    for max_step in [None, Some(Duration::from_millis(50))] {
        let mut s = Scheduler::new(SchedulerConfig { max_step, ..timed_config(1) }).unwrap();
        s.add(req(1, prompt(8, 0), params(100))).unwrap();
        // Steps run but nobody reports their time: no model, no cut.
        step(&mut s, 7);
        step(&mut s, 7);
        s.add(req(2, prompt(900, 500), params(4))).unwrap();
        let (out, _) = step(&mut s, 7);
        assert_eq!(scheduled(&out, 2), 511, "{max_step:?}: the budget less one decode");
        assert_eq!(s.stats().num_capped_steps, 0);
    }
    let bad = SchedulerConfig { max_step: Some(Duration::ZERO), ..config() };
    assert!(bad.validate().is_err());
}
