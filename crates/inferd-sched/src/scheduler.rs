use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Duration;

use inferd_core::{FinishReason, RequestId, TokenId};
use inferd_kv::{BlockPool, PoolStats, blocks_for};

use crate::waiting::WaitingQueue;
use crate::{
    NewSeq, PaddedShape, RunningSeq, SchedError, SchedulerConfig, SchedulerOutput, SeqStatus, SeqUpdate,
    Sequence, SequenceRequest, StepCostModel, StepPolicy, StepShape,
};

/// Prefill tokens a step gets under a step-time target even when the
/// decodes alone fill it, so a waiting prompt always progresses: one KV
/// block. (32 was measured to hold steps beside seven decodes at 1,000
/// tokens of context to about 200 ms on our 2-core CPU, over a 150 ms target.)
pub const MIN_PREFILL_CHUNK: usize = 16;

/// The prefill allowance of the step being planned under a step-time target.
#[derive(Debug)]
struct StepCap {
    target_ms: f64,
    /// The decodes of the step and the prefill chunks planned so far.
    planned: StepShape,
    prefilled: usize,
    /// Some prefill got fewer tokens than the budget would have given it.
    cut: bool,
}

impl StepCap {
    /// Counts a prefill chunk of `n` tokens after `computed` cached ones
    /// into the step being planned.
    fn add(&mut self, computed: usize, n: usize) {
        self.planned = self.planned + StepShape::chunk(computed, n);
        self.prefilled += n;
    }
}

/// Request ids are already unique integers: mix them once instead of SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type SeqMap = HashMap<RequestId, Sequence, BuildHasherDefault<IdHasher>>;

/// A snapshot of the scheduler's state for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub num_running: usize,
    pub num_waiting: usize,
    pub num_preemptions: u64,
    /// Steps whose prefill was cut short to keep within the step-time target.
    pub num_capped_steps: u64,
    pub kv: PoolStats,
}

/// Owns the sequences, their KV blocks and the waiting and running queues.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    seqs: SeqMap,
    waiting: WaitingQueue,
    /// Running sequences in admission order; the last is preempted first.
    running: Vec<RequestId>,
    finished_since_last_step: Vec<RequestId>,
    next_arrival_seq: u64,
    num_preemptions: u64,
    /// Step time as measured by the engine, for `max_step`.
    cost: StepCostModel,
    /// Steps whose prefill was cut short to keep within `max_step`.
    num_capped_steps: u64,
}

impl Scheduler {
    /// A scheduler over a fresh block pool sized by `config`.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedError> {
        config.validate()?;
        Ok(Scheduler {
            pool: BlockPool::new(config.num_blocks, config.block_size),
            config,
            seqs: SeqMap::default(),
            waiting: WaitingQueue::default(),
            running: Vec::new(),
            finished_since_last_step: Vec::new(),
            next_arrival_seq: 0,
            num_preemptions: 0,
            cost: StepCostModel::default(),
            num_capped_steps: 0,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The sequence with this id, if it is waiting or running.
    pub fn get(&self, id: RequestId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// True while any sequence waits or runs.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            num_running: self.running.len(),
            num_waiting: self.waiting.len(),
            num_preemptions: self.num_preemptions,
            num_capped_steps: self.num_capped_steps,
            kv: self.pool.stats(),
        }
    }

    /// Reports how long a planned step took to run, for the step-time
    /// cost model (see [`SchedulerConfig::max_step`]). Without a target
    /// nothing reads the model, so nothing is fitted.
    pub fn observe_step(&mut self, out: &SchedulerOutput, took: Duration) {
        if self.config.has_step_target() {
            self.cost.observe(StepShape::of(out), took);
        }
    }

    /// The fitted step-time model.
    pub fn cost_model(&self) -> &StepCostModel {
        &self.cost
    }

    /// Queues a new sequence. Refuses one that could never run: an empty
    /// prompt, one longer than the context, or one the whole cache cannot hold.
    pub fn add(&mut self, req: SequenceRequest) -> Result<(), SchedError> {
        if req.prompt.is_empty() {
            return Err(SchedError::EmptyPrompt);
        }
        if self.seqs.contains_key(&req.id) {
            return Err(SchedError::DuplicateId(req.id));
        }
        let max_tokens = req.params.max_tokens as usize;
        let max_len = req.prompt.len() + max_tokens;
        if req.prompt.len() >= self.config.max_model_len || max_len > self.config.max_model_len {
            return Err(SchedError::TooLong {
                prompt_tokens: req.prompt.len(),
                max_tokens,
                max_model_len: self.config.max_model_len,
            });
        }
        // A compiled step prefills a prompt whole, within one token budget.
        if self.config.buckets().is_some() && req.prompt.len() > self.config.token_budget() {
            return Err(SchedError::PromptOverCompiled {
                prompt_tokens: req.prompt.len(),
                max_prompt_tokens: self.config.token_budget(),
            });
        }
        // The last sampled token never needs KV, hence `max_len - 1`.
        let needed = blocks_for(max_len - 1, self.config.block_size);
        if needed > self.config.num_blocks {
            return Err(SchedError::NeverFits { needed, total: self.config.num_blocks });
        }
        let seq = Sequence::new(req, self.next_arrival_seq);
        self.next_arrival_seq += 1;
        self.waiting.push(&seq);
        self.seqs.insert(seq.id, seq);
        Ok(())
    }

    /// Ends a waiting or running sequence now and frees its blocks. Returns
    /// the sequence, or `None` if it is not here (already finished).
    pub fn abort(&mut self, id: RequestId, reason: FinishReason) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        if !self.waiting.remove(&seq) {
            self.running.retain(|&r| r != id);
        }
        self.pool.release(&mut seq.block_table);
        seq.status = SeqStatus::Finished(reason);
        self.finished_since_last_step.push(id);
        Some(seq)
    }

    /// The backend lost every sequence's KV (its worker died): ends every
    /// running sequence with `reason` and forgets the prefix cache, whose
    /// blocks no longer hold what they name. Waiting sequences never ran,
    /// or were preempted, so they keep their place. Returns the ended ones.
    pub fn backend_lost(&mut self, reason: FinishReason) -> Vec<Sequence> {
        let ended = self.running.clone().into_iter().filter_map(|id| self.abort(id, reason)).collect();
        self.pool.forget_cached();
        ended
    }

    /// Ends every sequence, waiting or running, and forgets the prefix
    /// cache (a backend that failed for good).
    pub fn abort_all(&mut self, reason: FinishReason) -> Vec<Sequence> {
        let mut ids: Vec<RequestId> = self.seqs.keys().copied().collect();
        ids.sort_unstable();
        let ended = ids.into_iter().filter_map(|id| self.abort(id, reason)).collect();
        self.pool.forget_cached();
        ended
    }

    /// Plans one step as the policy shapes it. Mixed: running sequences
    /// first, then waiting ones, within one token budget and the batch
    /// limit. Compiled: a prefill of whole prompts when a sequence waits
    /// and fits, else a decode of every running sequence.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput {
            finished_ids: std::mem::take(&mut self.finished_since_last_step),
            ..Default::default()
        };
        let mut budget = self.config.token_budget();
        match &self.config.policy {
            StepPolicy::Mixed => {
                let mut cap = self.step_cap();
                self.schedule_running(&mut budget, &mut out, &mut cap);
                if out.preempted_ids.is_empty() {
                    self.schedule_waiting(&mut budget, &mut out, false, &mut cap);
                }
                if cap.is_some_and(|c| c.cut) {
                    self.num_capped_steps += 1;
                }
            }
            StepPolicy::Compiled(_) => {
                self.schedule_waiting(&mut budget, &mut out, true, &mut None);
                if out.new_seqs.is_empty() {
                    self.schedule_running(&mut budget, &mut out, &mut None);
                }
            }
        }
        out.num_scheduled_tokens = self.config.token_budget() - budget;
        out.padded_shape = self.config.buckets().and_then(|b| {
            Some(PaddedShape {
                batch: b.batch_bucket(out.num_seqs())?,
                tokens: b.token_bucket(out.num_scheduled_tokens)?,
            })
        });
        out
    }

    /// The step-time allowance of this step: only under `max_step`, only
    /// when some sequence decodes (a step of prompts alone prefills at the
    /// full budget), and only once the cost model can predict.
    fn step_cap(&self) -> Option<StepCap> {
        let target = self.config.max_step?;
        let planned = self
            .running
            .iter()
            .map(|id| &self.seqs[id])
            .filter(|s| s.num_uncomputed() <= 1)
            .fold(StepShape::default(), |acc, s| acc + StepShape::chunk(s.num_computed_tokens, 1));
        if planned.seqs == 0 {
            return None;
        }
        self.cost.predict_ms(planned)?;
        Some(StepCap { target_ms: target.as_secs_f64() * 1e3, planned, prefilled: 0, cut: false })
    }

    /// How many of `wanted` prefill tokens after `computed` cached ones fit
    /// the step's time allowance (all of them without one). The first
    /// prefill of a step gets at least [`MIN_PREFILL_CHUNK`] tokens.
    fn prefill_chunk(&self, cap: &mut Option<StepCap>, computed: usize, wanted: usize) -> usize {
        match cap {
            Some(c) if wanted > 1 => {
                let mut n = self.cost.max_chunk(c.planned, computed, wanted, c.target_ms).unwrap_or(wanted);
                if c.prefilled == 0 {
                    n = n.max(MIN_PREFILL_CHUNK.min(wanted));
                }
                c.cut |= n < wanted;
                n
            }
            _ => wanted,
        }
    }

    fn schedule_running(&mut self, budget: &mut usize, out: &mut SchedulerOutput, cap: &mut Option<StepCap>) {
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let (computed, uncomputed) = (seq.num_computed_tokens, seq.num_uncomputed());
            let num_new = self.prefill_chunk(cap, computed, uncomputed.min(*budget));
            if num_new == 0 {
                i += 1;
                continue;
            }
            if let Some(c) = cap.as_mut().filter(|_| uncomputed > 1) {
                c.add(computed, num_new);
            }
            let target = seq.num_computed_tokens + num_new;
            // Make room by preempting from the back until this one fits.
            loop {
                let table = &mut self.seqs.get_mut(&id).expect("running ids are in the map").block_table;
                if self.pool.grow(table, target).is_ok() {
                    break;
                }
                let victim = self.running.pop().expect("the current sequence is running");
                self.preempt(victim, out);
                if victim == id {
                    return;
                }
            }
            out.running_seqs.push(RunningSeq {
                id,
                num_computed_tokens: self.seqs[&id].num_computed_tokens,
                num_scheduled_tokens: num_new,
            });
            *budget -= num_new;
            i += 1;
        }
    }

    fn preempt(&mut self, id: RequestId, out: &mut SchedulerOutput) {
        let seq = self.seqs.get_mut(&id).expect("preempted ids are in the map");
        self.pool.release(&mut seq.block_table);
        seq.num_computed_tokens = 0;
        seq.status = SeqStatus::Preempted;
        seq.num_preemptions += 1;
        self.waiting.push(seq);
        self.num_preemptions += 1;
        out.preempted_ids.push(id);
    }

    /// Admits waiting sequences in queue order until one does not fit the
    /// budget, the batch or the KV cache. Mixed: a prompt may be cut to the
    /// budget (chunked prefill) and gets blocks for what runs now. `whole`
    /// (compiled): only a whole remaining prompt, with blocks reserved for
    /// everything the sequence can ever hold, so decode never needs one
    /// that is not there.
    fn schedule_waiting(
        &mut self,
        budget: &mut usize,
        out: &mut SchedulerOutput,
        whole: bool,
        cap: &mut Option<StepCap>,
    ) {
        let seq_limit = self.config.seq_limit();
        while *budget > 0 && self.running.len() < seq_limit {
            let Some(id) = self.waiting.front() else { break };
            let seq = self.seqs.get_mut(&id).expect("waiting ids are in the map");
            let mut hit = 0;
            if self.config.enable_prefix_caching {
                // At least the last token is computed, to produce its logits.
                let (table, tokens) = seq.table_and_tokens();
                hit = self.pool.match_prefix(table, &tokens[..tokens.len() - 1]);
                seq.num_computed_tokens = hit;
            }
            let (computed, uncomputed) = (seq.num_computed_tokens, seq.num_uncomputed());
            let (num_new, reserve) = if whole {
                (uncomputed, seq.prompt().len() + seq.params.max_tokens as usize - 1)
            } else {
                let n = self.prefill_chunk(cap, computed, uncomputed.min(*budget));
                (n, computed + n)
            };
            let seq = self.seqs.get_mut(&id).expect("waiting ids are in the map");
            if num_new == 0 || num_new > *budget || self.pool.grow(&mut seq.block_table, reserve).is_err() {
                self.pool.release(&mut seq.block_table);
                seq.num_computed_tokens = 0;
                break;
            }
            self.waiting.pop_front();
            let first_time = seq.status == SeqStatus::Waiting;
            if first_time {
                seq.num_cached_tokens = hit.min(seq.prompt().len());
            }
            seq.status = SeqStatus::Running;
            out.new_seqs.push(NewSeq {
                id,
                num_computed_tokens: seq.num_computed_tokens,
                num_scheduled_tokens: num_new,
                first_time,
            });
            self.running.push(id);
            *budget -= num_new;
            if let Some(c) = cap.as_mut() {
                c.add(computed, num_new);
            }
        }
    }

    /// Applies a step's results: advances computed tokens, appends the
    /// sampled token of each sequence whose scheduled tokens reached its end,
    /// registers full blocks in the prefix cache and retires finished
    /// sequences. `sampled` follows the batch order of `output`; entries for
    /// prefill chunks that did not reach the end are ignored.
    pub fn update(
        &mut self,
        output: &SchedulerOutput,
        sampled: &[Option<TokenId>],
    ) -> Result<Vec<SeqUpdate>, SchedError> {
        if sampled.len() != output.num_seqs() {
            return Err(SchedError::SampleCount { got: sampled.len(), expected: output.num_seqs() });
        }
        let mut updates = Vec::with_capacity(sampled.len());
        let mut any_finished = false;
        for ((id, num_scheduled), &token) in output.batch().zip(sampled) {
            // Aborted between schedule() and update(): nothing to apply.
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            seq.num_computed_tokens += num_scheduled;
            if self.config.enable_prefix_caching {
                let num_computed = seq.num_computed_tokens;
                let (table, tokens) = seq.table_and_tokens();
                self.pool.commit_full_blocks(table, tokens, num_computed);
            }
            let mut update = SeqUpdate { id, token: None, finished: None, usage: seq.usage() };
            if seq.num_uncomputed() == 0 {
                let token = token.ok_or(SchedError::MissingSample(id))?;
                seq.push_token(token);
                update.token = Some(token);
                update.finished = seq.check_finished(&self.config.eos_token_ids, self.config.max_model_len);
                update.usage = seq.usage();
            }
            if let Some(reason) = update.finished {
                any_finished = true;
                seq.status = SeqStatus::Finished(reason);
                self.pool.release(&mut seq.block_table);
                self.seqs.remove(&id);
                self.finished_since_last_step.push(id);
            }
            updates.push(update);
        }
        if any_finished {
            let seqs = &self.seqs;
            self.running.retain(|id| seqs.contains_key(id));
        }
        Ok(updates)
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
