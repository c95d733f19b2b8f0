//! Property tests for the scheduler, driven by a fake executor that samples
//! random tokens. Invariants checked at every step:
//! - the step's scheduled tokens fit the token budget;
//! - running sequences never exceed max_num_seqs;
//! - every scheduled sequence's blocks cover its computed plus scheduled tokens;
//! - preempted sequences hold no blocks;
//! - every added request finishes or is aborted, and afterwards no block leaks.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use inferd_core::{FinishReason, RequestId, SamplingParams, TokenId};
use inferd_sched::{Scheduler, SchedulerConfig, SequenceRequest};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const EOS: TokenId = 0;

#[derive(Debug, Clone)]
struct Arrival {
    step: usize,
    prompt: Vec<TokenId>,
    max_tokens: u32,
    abort_after: Option<usize>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (0usize..20, prop::collection::vec(1u32..4, 1..40), 1u32..24, prop::option::weighted(0.2, 0usize..10))
        .prop_map(|(step, prompt, max_tokens, abort_after)| Arrival { step, prompt, max_tokens, abort_after })
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    let max_step = prop::option::of(1u64..40).prop_map(|ms| ms.map(Duration::from_millis));
    (1usize..6, 4usize..48, 8usize..40, prop::sample::select(vec![2usize, 4, 8]), any::<bool>(), max_step)
        .prop_map(|(max_num_seqs, budget, num_blocks, block_size, caching, max_step)| SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: budget,
            max_model_len: 64,
            block_size,
            num_blocks,
            enable_prefix_caching: caching,
            eos_token_ids: vec![EOS],
            policy: inferd_sched::StepPolicy::Mixed,
            max_step,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn scheduler_invariants_hold(
        cfg in config(),
        arrivals in prop::collection::vec(arrival(), 1..24),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut s = Scheduler::new(cfg.clone()).unwrap();
        let mut pending: HashSet<RequestId> = HashSet::new();
        let mut aborts: HashMap<usize, Vec<RequestId>> = HashMap::new();
        let mut ended: HashSet<RequestId> = HashSet::new();
        let mut step = 0usize;
        loop {
            for (i, a) in arrivals.iter().enumerate().filter(|(_, a)| a.step == step) {
                let id = RequestId(i as u64);
                let params = SamplingParams { max_tokens: a.max_tokens, ..Default::default() };
                let req = SequenceRequest::new(id, a.prompt.clone(), params);
                if s.add(req).is_ok() {
                    pending.insert(id);
                    if let Some(after) = a.abort_after {
                        aborts.entry(step + after).or_default().push(id);
                    }
                }
            }
            for id in aborts.remove(&step).unwrap_or_default() {
                if s.abort(id, FinishReason::Abort).is_some() {
                    prop_assert!(pending.remove(&id));
                    ended.insert(id);
                }
            }

            let out = s.schedule();
            prop_assert!(out.num_scheduled_tokens <= cfg.max_num_batched_tokens);
            prop_assert_eq!(out.batch().map(|(_, n)| n).sum::<usize>(), out.num_scheduled_tokens);
            let stats = s.stats();
            prop_assert!(stats.num_running <= cfg.max_num_seqs);
            prop_assert_eq!(stats.kv.free + stats.kv.used, cfg.num_blocks);
            for (id, n) in out.batch() {
                prop_assert!(n > 0);
                let seq = s.get(id).unwrap();
                prop_assert!(seq.block_table.len() * cfg.block_size >= seq.num_computed_tokens + n,
                    "blocks of {} do not cover its tokens", id);
            }
            for &id in &out.preempted_ids {
                prop_assert!(s.get(id).unwrap().block_table.is_empty());
            }

            let sampled: Vec<Option<TokenId>> = (0..out.num_seqs())
                .map(|_| Some(if rng.random_bool(0.05) { EOS } else { rng.random_range(1..4) }))
                .collect();
            // A machine of 1 ms a step and 0.5 ms a token: under a step-time
            // target the plans change, the invariants must not.
            s.observe_step(&out, Duration::from_micros(1000 + 500 * out.num_scheduled_tokens as u64));
            for u in s.update(&out, &sampled).unwrap() {
                if let Some(reason) = u.finished {
                    prop_assert!(reason == FinishReason::Stop || reason == FinishReason::Length);
                    prop_assert!(u.usage.completion_tokens >= 1);
                    prop_assert!(pending.remove(&u.id));
                    ended.insert(u.id);
                }
            }

            step += 1;
            let arrivals_left = arrivals.iter().any(|a| a.step >= step);
            if !arrivals_left && !s.has_work() {
                break;
            }
            prop_assert!(step < 10_000, "the scheduler stopped making progress");
        }
        prop_assert!(pending.is_empty(), "unfinished: {:?}", pending);
        let stats = s.stats();
        prop_assert_eq!(stats.kv.free, cfg.num_blocks, "blocks leaked");
        prop_assert_eq!(stats.kv.used, 0);
        prop_assert_eq!(stats.num_running + stats.num_waiting, 0);
    }
}
