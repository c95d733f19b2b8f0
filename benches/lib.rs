//! Fixtures shared by the criterion suites in this folder.

use std::sync::Arc;

use inferd_contract::ModelInput;
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
        let prompt = tokens(prompt_len, (i * prompt_len) as u32);
        let req = SequenceRequest::new(RequestId(i as u64), prompt, params.clone());
        s.add(req).expect("fits");
    }
    let out = s.schedule();
    let sampled = vec![Some(1); out.num_seqs()];
    s.update(&out, &sampled).expect("one sample per sequence");
    s
}

/// A decode step for `batch` sequences that each hold `context` cached
/// tokens: one new token per sequence, every sequence sampled. Sequence `s`
/// owns blocks `s * blocks_per_seq ..`.
pub fn decode_input(batch: usize, context: usize, block_size: usize) -> ModelInput {
    let blocks_per_seq = (context + 1).div_ceil(block_size);
    let mut input = ModelInput::new(blocks_per_seq);
    for s in 0..batch {
        let first = (s * blocks_per_seq) as u32;
        let blocks: Vec<u32> = (first..first + blocks_per_seq as u32).collect();
        input.push_seq(RequestId(s as u64), &[100 + s as u32], context, &blocks, block_size, true);
    }
    input
}

/// A prefill of `len` tokens for one sequence, its last row sampled.
pub fn prefill_input(len: usize, block_size: usize) -> ModelInput {
    let blocks: Vec<u32> = (0..len.div_ceil(block_size) as u32).collect();
    let tokens: Vec<u32> = (0..len as u32).map(|i| 100 + i % 5000).collect();
    let mut input = ModelInput::new(blocks.len());
    input.push_seq(RequestId(0), &tokens, 0, &blocks, block_size, true);
    input
}
