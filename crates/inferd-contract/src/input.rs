use std::sync::Arc;

use inferd_core::{RequestId, SamplingParams, TokenId};
use serde::{Deserialize, Serialize};

use crate::PaddedShape;

/// A sequence scheduled for the first time: what a backend that keeps
/// per-sequence state (a device sampler, a compiled model's batch slot)
/// needs to know about it, sent once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartedSeq {
    pub id: RequestId,
    pub prompt_len: u32,
    pub params: Arc<SamplingParams>,
}

/// One step's flat batch: the scheduled tokens of all sequences packed
/// together (sequence `s` owns tokens `query_start[s]..query_start[s + 1]`),
/// with everything attention needs to find each sequence's KV, and the
/// lifecycle events since the last step.
///
/// Each sequence's query tokens are the last ones of its context (positions
/// `context_len - query_len .. context_len`), so prefill, chunked prefill,
/// prefix-cache hits and decode are one causal rule: a token attends to its
/// own sequence's positions up to its own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInput {
    /// `S` sequence ids, in batch order.
    pub seq_ids: Vec<RequestId>,
    /// `T` token ids.
    pub token_ids: Vec<TokenId>,
    /// Each token's position in its own sequence.
    pub positions: Vec<u32>,
    /// Each token's KV slot: `block * block_size + offset`.
    pub slot_mapping: Vec<u32>,
    /// `S + 1` offsets into the tokens.
    pub query_start: Vec<u32>,
    /// Tokens each sequence has in the cache once this step's are written.
    pub context_lens: Vec<u32>,
    /// `S * max_blocks_per_seq` block ids, row `s` for sequence `s`, padded with 0.
    pub block_tables: Vec<u32>,
    pub max_blocks_per_seq: usize,
    /// The longest query (scheduled tokens) of any sequence.
    pub max_query_len: u32,
    /// The longest context of any sequence.
    pub max_context_len: u32,
    /// Rows whose next token is wanted (logits, or a sampled token), ascending.
    pub logits_rows: Vec<u32>,
    /// The compiled shape a static-shape backend pads this step to.
    pub padded_shape: Option<PaddedShape>,
    /// Sequences in this batch for the first time.
    pub started: Vec<StartedSeq>,
    /// Sequences whose KV was dropped since the last step; they come back
    /// later, recomputed into new blocks.
    pub preempted: Vec<RequestId>,
    /// Sequences gone for good since the last step (finished or aborted).
    pub finished: Vec<RequestId>,
}

impl ModelInput {
    /// An empty batch whose block-table rows are `max_blocks_per_seq` wide
    /// (widened as longer rows are pushed).
    pub fn new(max_blocks_per_seq: usize) -> Self {
        ModelInput { query_start: vec![0], max_blocks_per_seq, ..Default::default() }
    }

    /// Appends one sequence: its scheduled `tokens` at positions
    /// `start..start + tokens.len()`, written through `blocks` (its whole
    /// block table), asking for the last row's next token if `sample`.
    pub fn push_seq(
        &mut self,
        id: RequestId,
        tokens: &[TokenId],
        start: usize,
        blocks: &[u32],
        block_size: usize,
        sample: bool,
    ) {
        if blocks.len() > self.max_blocks_per_seq {
            self.widen_block_tables(blocks.len());
        }
        let end = start + tokens.len();
        self.seq_ids.push(id);
        self.token_ids.extend_from_slice(tokens);
        for pos in start..end {
            self.positions.push(pos as u32);
            // An out-of-table position gets slot u32::MAX, which validate() refuses.
            let slot = blocks
                .get(pos / block_size)
                .map_or(u32::MAX, |b| b * block_size as u32 + (pos % block_size) as u32);
            self.slot_mapping.push(slot);
        }
        let rows = self.token_ids.len() as u32;
        if sample && !tokens.is_empty() {
            self.logits_rows.push(rows - 1);
        }
        self.query_start.push(rows);
        self.context_lens.push(end as u32);
        self.block_tables.extend_from_slice(blocks);
        self.block_tables.resize(self.seq_ids.len() * self.max_blocks_per_seq, 0);
        self.max_query_len = self.max_query_len.max(tokens.len() as u32);
        self.max_context_len = self.max_context_len.max(end as u32);
    }

    fn widen_block_tables(&mut self, width: usize) {
        let old = std::mem::take(&mut self.block_tables);
        for row in old.chunks(self.max_blocks_per_seq.max(1)).take(self.seq_ids.len()) {
            self.block_tables.extend_from_slice(row);
            self.block_tables.resize(self.block_tables.len() + width - row.len(), 0);
        }
        self.max_blocks_per_seq = width;
    }

    /// Number of packed tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    /// Block table row of sequence `s`.
    pub fn block_table(&self, s: usize) -> &[u32] {
        &self.block_tables[s * self.max_blocks_per_seq..(s + 1) * self.max_blocks_per_seq]
    }

    /// The tokens of sequence `s`: `query_start[s]..query_start[s + 1]`.
    pub fn query_range(&self, s: usize) -> std::ops::Range<usize> {
        self.query_start[s] as usize..self.query_start[s + 1] as usize
    }

    /// The sequence of each row of `logits_rows`, in order.
    pub fn row_seqs(&self) -> Vec<usize> {
        let mut seq = 0;
        self.logits_rows
            .iter()
            .map(|&r| {
                while self.query_start[seq + 1] <= r {
                    seq += 1;
                }
                seq
            })
            .collect()
    }

    /// Checks every invariant a backend relies on, so a bad input is an
    /// error rather than an out-of-bounds access on a device.
    pub fn validate(&self, block_size: usize, num_blocks: usize) -> Result<(), String> {
        self.validate_layout()?;
        self.validate_cache(block_size, num_blocks)?;
        self.validate_lifecycle()
    }

    fn validate_layout(&self) -> Result<(), String> {
        let t = self.token_ids.len();
        let s = self.context_lens.len();
        if self.positions.len() != t || self.slot_mapping.len() != t {
            return Err("positions and slot_mapping must have one entry per token".into());
        }
        if self.seq_ids.len() != s {
            return Err("seq_ids must have one entry per sequence".into());
        }
        if self.query_start.len() != s + 1 || self.query_start.first() != Some(&0) {
            return Err("query_start must have num_seqs + 1 entries starting at 0".into());
        }
        if self.query_start.last().map(|&n| n as usize) != Some(t) {
            return Err("query_start must end at num_tokens".into());
        }
        let (mut max_q, mut max_ctx) = (0, 0);
        for seq in 0..s {
            let (a, b) = (self.query_start[seq], self.query_start[seq + 1]);
            if b <= a {
                return Err(format!("sequence {seq} has no tokens (query_start must strictly ascend)"));
            }
            let (q, ctx) = (b - a, self.context_lens[seq]);
            if q > ctx {
                return Err(format!("sequence {seq} has more query tokens than context"));
            }
            // Query tokens are the last of the context, in order.
            let first = ctx - q;
            if self.positions[a as usize..b as usize].iter().zip(first..).any(|(&p, want)| p != want) {
                return Err(format!("sequence {seq}: positions must run {first}..{ctx}"));
            }
            max_q = max_q.max(q);
            max_ctx = max_ctx.max(ctx);
        }
        if (self.max_query_len, self.max_context_len) != (max_q, max_ctx) {
            return Err(format!(
                "max_query_len/max_context_len are {}/{}, the batch has {max_q}/{max_ctx}",
                self.max_query_len, self.max_context_len
            ));
        }
        if !self.logits_rows.is_sorted_by(|a, b| a < b)
            || self.logits_rows.last().is_some_and(|&r| r as usize >= t)
        {
            return Err("logits_rows must be strictly ascending rows of the batch".into());
        }
        if let Some(p) = self.padded_shape
            && (p.batch < s || p.tokens < t)
        {
            return Err(format!("padded shape {p:?} is smaller than the batch ({s} sequences, {t} tokens)"));
        }
        Ok(())
    }

    fn validate_cache(&self, block_size: usize, num_blocks: usize) -> Result<(), String> {
        let s = self.context_lens.len();
        if self.block_tables.len() != s * self.max_blocks_per_seq {
            return Err("block_tables must be num_seqs * max_blocks_per_seq".into());
        }
        if self.block_tables.iter().any(|&b| b as usize >= num_blocks)
            || self.slot_mapping.iter().any(|&x| x as usize >= num_blocks * block_size)
        {
            return Err("block id or slot out of the cache".into());
        }
        for seq in 0..s {
            let ctx = self.context_lens[seq] as usize;
            if ctx.div_ceil(block_size) > self.max_blocks_per_seq {
                return Err(format!("sequence {seq} has more context than its block table covers"));
            }
            let table = self.block_table(seq);
            for i in self.query_range(seq) {
                let pos = self.positions[i] as usize;
                if self.slot_mapping[i] as usize
                    != table[pos / block_size] as usize * block_size + pos % block_size
                {
                    return Err(format!("sequence {seq}: slot of position {pos} is not in its block table"));
                }
            }
        }
        Ok(())
    }

    fn validate_lifecycle(&self) -> Result<(), String> {
        let mut ids = self.seq_ids.clone();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err("a sequence appears twice in one batch".into());
        }
        let in_batch = |id: &RequestId| ids.binary_search(id).is_ok();
        if let Some(s) = self.started.iter().find(|s| !in_batch(&s.id)) {
            return Err(format!("{} started but is not in the batch", s.id));
        }
        if let Some(id) = self.finished.iter().chain(&self.preempted).find(|id| in_batch(id)) {
            return Err(format!("{id} is in the batch but was reported finished or preempted"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_seqs() -> ModelInput {
        let mut input = ModelInput::new(1);
        // Sequence 1: a 5-token prefill into blocks 7, 2 (block size 4).
        input.push_seq(RequestId(1), &[10, 11, 12, 13, 14], 0, &[7, 2], 4, true);
        // Sequence 2: one decode token at position 9, blocks 0, 5, 3.
        input.push_seq(RequestId(2), &[20], 9, &[0, 5, 3], 4, true);
        input
    }

    #[test]
    fn push_seq_builds_the_flat_layout() {
        let input = two_seqs();
        assert_eq!(input.query_start, [0, 5, 6]);
        assert_eq!(input.positions, [0, 1, 2, 3, 4, 9]);
        assert_eq!(input.slot_mapping, [28, 29, 30, 31, 8, 13]);
        assert_eq!(input.context_lens, [5, 10]);
        assert_eq!(input.max_blocks_per_seq, 3, "widened for the longer table");
        assert_eq!(input.block_tables, [7, 2, 0, 0, 5, 3]);
        assert_eq!(input.logits_rows, [4, 5]);
        assert_eq!((input.max_query_len, input.max_context_len), (5, 10));
        assert_eq!(input.validate(4, 8), Ok(()));
        assert_eq!(input.row_seqs(), [0, 1]);
        let mut all_rows = input.clone();
        all_rows.logits_rows = (0..6).collect();
        assert_eq!(all_rows.row_seqs(), [0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn validate_refuses_what_a_kernel_would_misread() {
        let base = two_seqs();
        let check = |f: &dyn Fn(&mut ModelInput), want: &str| {
            let mut input = base.clone();
            f(&mut input);
            let err = input.validate(4, 8).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        };
        check(&|i| i.positions[2] = 7, "positions must run");
        check(&|i| i.slot_mapping[0] = 0, "not in its block table");
        check(&|i| i.block_tables[0] = 8, "out of the cache");
        check(
            &|i| {
                // Position 12 of a 13-token context needs a 4th block.
                (i.context_lens[1], i.positions[5], i.max_context_len) = (13, 12, 13);
            },
            "block table covers",
        );
        check(&|i| i.max_query_len = 1, "max_query_len");
        check(&|i| i.logits_rows = vec![5, 4], "logits_rows");
        check(&|i| i.seq_ids[1] = RequestId(1), "twice");
        check(&|i| i.finished.push(RequestId(2)), "reported finished");
        check(&|i| i.padded_shape = Some(PaddedShape { batch: 1, tokens: 8 }), "smaller than the batch");
        check(
            &|i| {
                let params = Arc::new(SamplingParams::default());
                i.started.push(StartedSeq { id: RequestId(9), prompt_len: 1, params })
            },
            "not in the batch",
        );
        check(&|i| i.push_seq(RequestId(3), &[1], 40, &[1], 4, false), "out of the cache");
    }

    #[test]
    fn inputs_cross_a_process_boundary_intact() {
        let mut input = two_seqs();
        input.padded_shape = Some(PaddedShape { batch: 2, tokens: 8 });
        let params = Arc::new(SamplingParams { temperature: 0.5, seed: Some(3), ..Default::default() });
        input.started.push(StartedSeq { id: RequestId(1), prompt_len: 5, params });
        input.finished.push(RequestId(4));
        let json = serde_json::to_string(&input).unwrap();
        let back: ModelInput = serde_json::from_str(&json).unwrap();
        assert_eq!(back, input);
    }
}
