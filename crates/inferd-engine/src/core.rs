//! One engine step in three calls, nano-vllm style: schedule, run (execute
//! and sample), postprocess (update the scheduler).

use std::collections::HashMap;

use inferd_core::{FinishReason, RequestId, TokenId, Usage};
use inferd_exec::{BatchState, ModelExecutor, Sampled};
use inferd_sched::{SchedError, Scheduler, SchedulerConfig, SchedulerStats, SequenceRequest};
use thiserror::Error;
use tracing::debug_span;

/// Errors of the engine.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Sched(#[from] SchedError),
}

/// Limits of the engine that the executor does not dictate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Upper bound on a sequence's length; the executor may lower it.
    pub max_model_len: usize,
    pub enable_prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: 2048,
            enable_prefix_caching: true,
        }
    }
}

/// What one step did for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    pub id: RequestId,
    /// The token sampled this step (none for an unfinished prefill chunk).
    pub sampled: Option<Sampled>,
    /// Set when the sequence ended this step.
    pub finished: Option<FinishReason>,
    pub usage: Usage,
    /// Set when the backend failed this sequence (then `finished` is `Error`).
    pub error: Option<String>,
    /// Set on the step the sequence was first scheduled.
    pub first_scheduled: bool,
}

/// The scheduler, the executor and the batch state, stepped together.
#[derive(Debug)]
pub struct EngineCore<E> {
    scheduler: Scheduler,
    executor: E,
    batch: BatchState,
    last_step_tokens: usize,
}

impl<E: ModelExecutor> EngineCore<E> {
    /// Sizes the scheduler from the executor's capabilities.
    pub fn new(executor: E, cfg: &EngineConfig, eos_token_ids: Vec<TokenId>) -> Result<Self, EngineError> {
        let caps = executor.capabilities();
        let sched_cfg = SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
            max_model_len: cfg.max_model_len.min(caps.max_model_len),
            block_size: caps.block_size,
            num_blocks: caps.num_blocks,
            enable_prefix_caching: cfg.enable_prefix_caching,
            eos_token_ids: eos_token_ids.clone(),
            shape_buckets: caps.shape_buckets.clone(),
        };
        Ok(EngineCore {
            scheduler: Scheduler::new(sched_cfg)?,
            executor,
            batch: BatchState::new(caps.block_size, eos_token_ids),
            last_step_tokens: 0,
        })
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn stats(&self) -> SchedulerStats {
        self.scheduler.stats()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// Tokens the last step computed.
    pub fn last_step_tokens(&self) -> usize {
        self.last_step_tokens
    }

    /// Queues a sequence; refuses one that could never run.
    pub fn add(&mut self, req: SequenceRequest) -> Result<(), EngineError> {
        Ok(self.scheduler.add(req)?)
    }

    /// Ends a sequence now, freeing its blocks; its usage so far, if it was here.
    pub fn abort(&mut self, id: RequestId, reason: FinishReason) -> Option<Usage> {
        self.scheduler.abort(id, reason).map(|seq| seq.usage())
    }

    /// Runs one step. A backend failure ends every sequence of the step with
    /// an error output rather than leaving any of them hanging.
    pub fn step(&mut self) -> Result<Vec<SeqOutput>, EngineError> {
        let out = self.scheduler.schedule();
        self.last_step_tokens = out.num_scheduled_tokens;
        let _span = debug_span!("step", seqs = out.num_seqs(), tokens = out.num_scheduled_tokens).entered();
        if out.is_empty() {
            // Still let the batch state drop finished sequences.
            self.batch.prepare(&out).ok();
            return Ok(Vec::new());
        }
        let first: Vec<RequestId> = out.new_seqs.iter().filter(|n| n.first_time).map(|n| n.id).collect();
        let run = self
            .batch
            .prepare(&out)
            .and_then(|input| self.executor.execute(&input))
            .and_then(|output| self.batch.sample(&out, &output));
        let sampled = match run {
            Ok(sampled) => sampled,
            Err(e) => {
                return Ok(self.fail(&out.batch().map(|(id, _)| id).collect::<Vec<_>>(), &e.to_string()));
            }
        };
        let tokens: Vec<Option<TokenId>> = sampled.iter().map(|s| s.as_ref().map(|s| s.token)).collect();
        let updates = self.scheduler.update(&out, &tokens)?;
        let mut by_id: HashMap<RequestId, Sampled> = HashMap::new();
        for ((id, _), s) in out.batch().zip(sampled) {
            if let Some(s) = s {
                by_id.insert(id, s);
            }
        }
        Ok(updates
            .into_iter()
            .map(|u| SeqOutput {
                sampled: by_id.remove(&u.id),
                first_scheduled: first.contains(&u.id),
                id: u.id,
                finished: u.finished,
                usage: u.usage,
                error: None,
            })
            .collect())
    }

    fn fail(&mut self, ids: &[RequestId], message: &str) -> Vec<SeqOutput> {
        tracing::error!(error = message, seqs = ids.len(), "step failed; ending its sequences");
        ids.iter()
            .filter_map(|&id| {
                let usage = self.scheduler.abort(id, FinishReason::Error)?.usage();
                self.batch.remove(id);
                Some(SeqOutput {
                    id,
                    sampled: None,
                    finished: Some(FinishReason::Error),
                    usage,
                    error: Some(message.to_string()),
                    first_scheduled: false,
                })
            })
            .collect()
    }

    /// Steps until every queued sequence has finished; returns each one's
    /// output tokens. For tests, benches and batch jobs.
    pub fn run_to_completion(&mut self) -> Result<HashMap<RequestId, Vec<TokenId>>, EngineError> {
        let mut outputs: HashMap<RequestId, Vec<TokenId>> = HashMap::new();
        while self.has_work() {
            for o in self.step()? {
                let entry = outputs.entry(o.id).or_default();
                if let Some(s) = o.sampled {
                    entry.push(s.token);
                }
            }
        }
        Ok(outputs)
    }
}
