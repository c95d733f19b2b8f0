//! The executor side of each step: mirrors the scheduler's sequences from its
//! outputs (full data once, then only changes), builds the flat
//! [`ModelInput`], and samples the next tokens from the logits.

use std::collections::HashMap;
use std::sync::Arc;

use inferd_core::{RequestId, SamplingParams, TokenId, TokenLogprobs};
use inferd_sched::SchedulerOutput;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::sampler::{SampleContext, sample};
use crate::{ExecError, ModelInput, ModelOutput};

/// A sampled token and, when asked for, its logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Debug)]
struct SeqState {
    /// Prompt then output, including the last sampled token.
    tokens: Vec<TokenId>,
    prompt_len: usize,
    block_ids: Vec<u32>,
    num_computed: usize,
    params: Arc<SamplingParams>,
    /// Kept across preemption, so a seeded request draws the same tokens.
    rng: StdRng,
}

/// The sequences of the running batch, as the executor side sees them.
#[derive(Debug)]
pub struct BatchState {
    seqs: HashMap<RequestId, SeqState>,
    block_size: usize,
    eos_token_ids: Vec<TokenId>,
}

impl BatchState {
    pub fn new(block_size: usize, eos_token_ids: Vec<TokenId>) -> Self {
        BatchState { seqs: HashMap::new(), block_size, eos_token_ids }
    }

    /// Sequences currently mirrored.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Applies `out`'s changes and builds this step's input.
    pub fn prepare(&mut self, out: &SchedulerOutput) -> Result<ModelInput, ExecError> {
        for id in &out.finished_ids {
            self.seqs.remove(id);
        }
        for id in &out.preempted_ids {
            if let Some(s) = self.seqs.get_mut(id) {
                s.block_ids.clear();
                s.num_computed = 0;
            }
        }
        for r in &out.running_seqs {
            let s = self.seqs.get_mut(&r.id).ok_or_else(|| missing(r.id))?;
            s.block_ids.extend(r.new_block_ids.iter().map(|b| b.index() as u32));
            s.num_computed = r.num_computed_tokens;
        }
        for n in &out.new_seqs {
            let block_ids = n.block_ids.iter().map(|b| b.index() as u32).collect();
            match self.seqs.get_mut(&n.id) {
                Some(s) if !n.first_time => {
                    s.tokens.clone_from(&n.token_ids);
                    s.block_ids = block_ids;
                    s.num_computed = n.num_computed_tokens;
                }
                _ => {
                    let rng = match n.params.seed {
                        Some(seed) => StdRng::seed_from_u64(seed),
                        None => StdRng::from_os_rng(),
                    };
                    let state = SeqState {
                        tokens: n.token_ids.clone(),
                        prompt_len: n.token_ids.len(),
                        block_ids,
                        num_computed: n.num_computed_tokens,
                        params: n.params.clone(),
                        rng,
                    };
                    self.seqs.insert(n.id, state);
                }
            }
        }
        self.build(out)
    }

    fn build(&self, out: &SchedulerOutput) -> Result<ModelInput, ExecError> {
        let bs = self.block_size;
        let mut input = ModelInput { query_start: vec![0], ..Default::default() };
        let mut max_blocks = 0;
        for (id, _) in out.batch() {
            let s = &self.seqs[&id];
            max_blocks = max_blocks.max(s.block_ids.len());
        }
        input.max_blocks_per_seq = max_blocks;
        for (id, n) in out.batch() {
            let s = &self.seqs[&id];
            let end = s.num_computed + n;
            if end > s.tokens.len() || end.div_ceil(bs) > s.block_ids.len() {
                return Err(ExecError::Input(format!(
                    "{id}: {end} tokens scheduled beyond its tokens or blocks"
                )));
            }
            for pos in s.num_computed..end {
                input.token_ids.push(s.tokens[pos]);
                input.positions.push(pos as u32);
                input.slot_mapping.push(s.block_ids[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            let row_end = input.token_ids.len() as u32;
            if end == s.tokens.len() {
                input.logits_rows.push(row_end - 1);
            }
            input.query_start.push(row_end);
            input.context_lens.push(end as u32);
            input.block_tables.extend(&s.block_ids);
            input.block_tables.resize(input.query_start.len().saturating_sub(1) * max_blocks, 0);
        }
        Ok(input)
    }

    /// Samples a token for every sequence whose scheduled tokens reached its
    /// end, in batch order (`None` for a prefill chunk that did not), and
    /// appends it to that sequence.
    pub fn sample(
        &mut self,
        out: &SchedulerOutput,
        output: &ModelOutput,
    ) -> Result<Vec<Option<Sampled>>, ExecError> {
        let (rows, vocab) = output.logits.dims2()?;
        // One host copy of the logits; each row is then sampled in place.
        let mut logits = output.logits.flatten_all()?.to_vec1::<f32>()?;
        let mut row = 0;
        let mut sampled = Vec::with_capacity(out.num_seqs());
        for (id, n) in out.batch() {
            let s = self.seqs.get_mut(&id).ok_or_else(|| missing(id))?;
            s.num_computed += n;
            if s.num_computed < s.tokens.len() {
                sampled.push(None);
                continue;
            }
            if row >= rows {
                return Err(ExecError::Input(format!("no logits row for {id}")));
            }
            let l = &mut logits[row * vocab..(row + 1) * vocab];
            row += 1;
            let ctx = SampleContext {
                params: &s.params,
                tokens: &s.tokens,
                prompt_len: s.prompt_len,
                eos_token_ids: &self.eos_token_ids,
            };
            let (token, logprobs) = sample(l, &ctx, &mut s.rng);
            s.tokens.push(token);
            sampled.push(Some(Sampled { token, logprobs }));
        }
        Ok(sampled)
    }

    /// Forgets a sequence the engine ended outside the scheduler's outputs.
    pub fn remove(&mut self, id: RequestId) {
        self.seqs.remove(&id);
    }
}

fn missing(id: RequestId) -> ExecError {
    ExecError::Input(format!("{id} is not in the batch state"))
}
