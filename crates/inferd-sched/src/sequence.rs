use std::sync::Arc;
use std::time::Instant;

use inferd_core::{FinishReason, RequestId, SamplingParams, TokenId, Usage};
use inferd_kv::BlockTable;

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Never scheduled yet.
    Waiting,
    Running,
    /// Preempted by recompute: back in the waiting queue, holding no blocks.
    Preempted,
    Finished(FinishReason),
}

/// What the engine hands the scheduler for one new sequence.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    pub id: RequestId,
    pub prompt: Vec<TokenId>,
    pub params: Arc<SamplingParams>,
    /// Higher runs first; equal priorities run in arrival order.
    pub priority: i32,
    pub arrival: Instant,
}

impl SequenceRequest {
    /// A request arriving now at the default priority.
    pub fn new(id: RequestId, prompt: Vec<TokenId>, params: impl Into<Arc<SamplingParams>>) -> Self {
        SequenceRequest { id, prompt, params: params.into(), priority: 0, arrival: Instant::now() }
    }
}

/// One sequence: its tokens, how many have KV written, and its blocks.
#[derive(Debug)]
pub struct Sequence {
    pub id: RequestId,
    /// Prompt followed by output.
    tokens: Vec<TokenId>,
    prompt_len: usize,
    /// Tokens whose KV is in the cache (computed or found in the prefix cache).
    pub num_computed_tokens: usize,
    /// Prompt tokens found in the prefix cache when first scheduled.
    pub num_cached_tokens: usize,
    pub status: SeqStatus,
    pub block_table: BlockTable,
    pub params: Arc<SamplingParams>,
    pub priority: i32,
    pub arrival: Instant,
    /// Tie-break for equal priorities: arrival order.
    pub(crate) arrival_seq: u64,
    pub num_preemptions: u32,
}

impl Sequence {
    pub(crate) fn new(req: SequenceRequest, arrival_seq: u64) -> Self {
        Sequence {
            id: req.id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            num_computed_tokens: 0,
            num_cached_tokens: 0,
            status: SeqStatus::Waiting,
            block_table: BlockTable::new(),
            params: req.params,
            priority: req.priority,
            arrival: req.arrival,
            arrival_seq,
            num_preemptions: 0,
        }
    }

    /// Prompt then output tokens.
    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    pub fn prompt(&self) -> &[TokenId] {
        &self.tokens[..self.prompt_len]
    }

    pub fn output(&self) -> &[TokenId] {
        &self.tokens[self.prompt_len..]
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Tokens still to compute before the next sample.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed_tokens
    }

    /// The block table and the tokens, borrowed together.
    pub(crate) fn table_and_tokens(&mut self) -> (&mut inferd_kv::BlockTable, &[TokenId]) {
        (&mut self.block_table, &self.tokens)
    }

    pub(crate) fn push_token(&mut self, token: TokenId) {
        self.tokens.push(token);
    }

    /// Token accounting so far.
    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: self.output().len() as u32,
            cached_prompt_tokens: self.num_cached_tokens as u32,
        }
    }

    /// Why the sequence ends after the token it just appended, if it does.
    pub(crate) fn check_finished(
        &self,
        eos_token_ids: &[TokenId],
        max_model_len: usize,
    ) -> Option<FinishReason> {
        let generated = self.output().len() as u32;
        let last = *self.tokens.last()?;
        if self.params.is_stop_token(last, eos_token_ids, generated) {
            Some(FinishReason::Stop)
        } else if generated >= self.params.max_tokens || self.tokens.len() >= max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}
