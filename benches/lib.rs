//! Fixtures shared by the criterion suites in this folder.

use std::sync::Arc;
use std::time::Instant;

use inferd_core::{RequestId, SamplingParams, TokenId};
use inferd_sched::{Scheduler, SchedulerConfig, SequenceRequest};

/// `len` distinct tokens starting at `start`.
pub fn tokens(len: usize, start: u32) -> Vec<TokenId> {
    (start..start + len as u32).collect()
}

/// A scheduler with `num_seqs` sequences that have finished their
/// `prompt_len`-token prefill and now decode one token per step.
pub fn decoding_scheduler(num_seqs: usize, prompt_len: usize) -> Scheduler {
    let max_tokens = 1024u32;
    let config = SchedulerConfig {
        max_num_seqs: num_seqs,
        max_num_batched_tokens: num_seqs * prompt_len,
        max_model_len: prompt_len + max_tokens as usize,
        num_blocks: num_seqs * (prompt_len + max_tokens as usize).div_ceil(16),
        ..Default::default()
    };
    let mut s = Scheduler::new(config).expect("valid config");
    let params = Arc::new(SamplingParams { max_tokens, ignore_eos: true, ..Default::default() });
    for i in 0..num_seqs {
        let req = SequenceRequest {
            id: RequestId(i as u64),
            prompt: tokens(prompt_len, (i * prompt_len) as u32),
            params: params.clone(),
            priority: 0,
            arrival: Instant::now(),
        };
        s.add(req).expect("fits");
    }
    let out = s.schedule();
    let sampled = vec![Some(1); out.num_seqs()];
    s.update(&out, &sampled).expect("one sample per sequence");
    s
}
