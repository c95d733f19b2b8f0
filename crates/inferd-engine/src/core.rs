//! One engine step, nano-vllm style: schedule, execute, sample, update.

use std::collections::HashMap;

use inferd_contract::{Capabilities, ExecError, Logits, ModelExecutor, ModelOutput, SampledToken};
use inferd_core::{FinishReason, RequestId, SamplingParams, TokenConstraint, TokenId, Usage};
use inferd_exec::sampler::{SampleContext, sample};
use inferd_sched::{
    SchedError, Scheduler, SchedulerConfig, SchedulerOutput, SchedulerStats, SequenceRequest, StepPolicy,
};
use thiserror::Error;
use tracing::debug_span;

use crate::input::{self, reaches_end, scheduled};

/// Errors of the engine.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Sched(#[from] SchedError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The scheduler's plan and its sequences disagree (a bug).
    #[error("engine state is inconsistent: {0}")]
    Inconsistent(String),
    /// The device failed for good; this instance takes no more work.
    #[error("the backend failed and this instance takes no more work: {0}")]
    BackendFailed(String),
}

/// Whether the backend can run steps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackendHealth {
    #[default]
    Up,
    /// It lost its state (its worker died or hung); the engine restarts it
    /// with backoff and waiting sequences run once it is back.
    Restarting { reason: String },
    /// The device reported a hardware error: nothing runs again here.
    Failed { reason: String },
}

/// Limits of the engine that the executor does not dictate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Upper bound on a sequence's length; the executor may lower it.
    pub max_model_len: usize,
    pub enable_prefix_caching: bool,
    /// Step-time target while sequences decode: prefill chunks beside them
    /// are sized from the measured cost of past steps (see
    /// `inferd_sched::SchedulerConfig::max_step`). `None`: no target.
    pub max_step: Option<std::time::Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_model_len: 2048,
            enable_prefix_caching: true,
            max_step: None,
        }
    }
}

/// What one step did for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    pub id: RequestId,
    /// The token sampled this step (none for an unfinished prefill chunk).
    pub sampled: Option<SampledToken>,
    /// Set when the sequence ended this step.
    pub finished: Option<FinishReason>,
    pub usage: Usage,
    /// Set when the backend failed this sequence (then `finished` is `Error`).
    pub error: Option<String>,
    /// Set on the step the sequence was first scheduled.
    pub first_scheduled: bool,
}

fn error_outputs(ended: Vec<inferd_sched::Sequence>, message: &str) -> Vec<SeqOutput> {
    ended
        .into_iter()
        .map(|seq| SeqOutput {
            id: seq.id,
            sampled: None,
            finished: Some(FinishReason::Error),
            usage: seq.usage(),
            error: Some(message.to_string()),
            first_scheduled: false,
        })
        .collect()
}

/// The allowed-token masks of the constrained sequences this step samples.
/// A constraint that fails allows only the first end-of-sequence token (the
/// sequence then stops) rather than letting output stray from its grammar.
fn constraint_masks(
    scheduler: &Scheduler,
    out: &SchedulerOutput,
    constraints: &mut HashMap<RequestId, Box<dyn TokenConstraint>>,
    vocab: usize,
) -> HashMap<RequestId, Vec<u32>> {
    let mut masks = HashMap::new();
    for (id, n) in out.batch() {
        let Some(c) = constraints.get_mut(&id) else { continue };
        let Ok(seq) = scheduled(scheduler, id) else { continue };
        if !reaches_end(seq, n) {
            continue;
        }
        let mut mask = vec![0u32; vocab.div_ceil(32)];
        if let Err(e) = c.allowed(&mut mask) {
            tracing::error!(%id, error = %e, "the grammar could not say what comes next; ending the sequence");
            mask.fill(0);
            if let Some(&eos) = scheduler.config().eos_token_ids.first() {
                inferd_core::mask_allow(&mut mask, eos);
            }
        }
        masks.insert(id, mask);
    }
    masks
}

/// A step's output, taken one sampled row at a time.
enum Rows {
    Logits { logits: Logits, next: usize },
    Sampled(std::vec::IntoIter<SampledToken>),
}

impl Rows {
    fn next(&mut self, ctx: &SampleContext) -> Option<SampledToken> {
        match self {
            Rows::Logits { logits, next } if *next < logits.num_rows() => {
                *next += 1;
                Some(sample(logits.row_mut(*next - 1), ctx))
            }
            Rows::Logits { .. } => None,
            Rows::Sampled(tokens) => tokens.next(),
        }
    }

    fn is_done(&self) -> bool {
        match self {
            Rows::Logits { logits, next } => *next == logits.num_rows(),
            Rows::Sampled(tokens) => tokens.len() == 0,
        }
    }
}

/// The scheduler and the executor, stepped together. The scheduler owns
/// every sequence's state; the executor sees only the contract's inputs.
#[derive(Debug)]
pub struct EngineCore<E> {
    scheduler: Scheduler,
    executor: E,
    caps: Capabilities,
    eos_token_ids: Vec<TokenId>,
    /// Sequences gone since the last input; the next input reports them.
    retired: Vec<RequestId>,
    last_step_tokens: usize,
    health: BackendHealth,
    /// Sequences whose tokens a grammar decides too, with their states.
    constraints: HashMap<RequestId, Box<dyn TokenConstraint>>,
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
            // A backend that reports compiled shapes runs only those.
            policy: caps
                .shape_buckets
                .as_ref()
                .map_or(StepPolicy::Mixed, |b| StepPolicy::Compiled(input::sched_buckets(b))),
            max_step: cfg.max_step,
        };
        Ok(EngineCore {
            scheduler: Scheduler::new(sched_cfg)?,
            executor,
            caps,
            eos_token_ids,
            retired: Vec::new(),
            last_step_tokens: 0,
            health: BackendHealth::Up,
            constraints: HashMap::new(),
        })
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// What the backend reported when it was built.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn executor(&self) -> &E {
        &self.executor
    }

    pub fn stats(&self) -> SchedulerStats {
        self.scheduler.stats()
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    pub fn health(&self) -> &BackendHealth {
        &self.health
    }

    /// Asks the backend whether it lost its state since the last step; if
    /// it did, ends the sequences it held (see [`BackendHealth`]).
    pub fn check_backend(&mut self) -> Vec<SeqOutput> {
        match self.executor.check() {
            Ok(()) => Vec::new(),
            Err(e @ ExecError::Hardware(_)) => self.lose_backend(&e),
            Err(e) => self.lose_backend(&ExecError::Lost(e.to_string())),
        }
    }

    /// Restarts a backend that lost its state. On success the engine
    /// steps again; a hardware error makes the failure final.
    pub fn recover(&mut self) -> Result<(), ExecError> {
        if self.health == BackendHealth::Up {
            return Ok(());
        }
        match self.executor.recover() {
            Ok(()) => {
                tracing::info!("backend restarted; serving again");
                self.health = BackendHealth::Up;
                Ok(())
            }
            Err(e) => {
                if let ExecError::Hardware(reason) = &e {
                    self.health = BackendHealth::Failed { reason: reason.clone() };
                    self.scheduler.abort_all(FinishReason::Error);
                }
                Err(e)
            }
        }
    }

    /// Tokens the last step computed.
    pub fn last_step_tokens(&self) -> usize {
        self.last_step_tokens
    }

    /// Queues a sequence; refuses one that could never run, and every one
    /// once the backend has failed for good.
    pub fn add(&mut self, req: SequenceRequest) -> Result<(), EngineError> {
        self.add_constrained(req, None)
    }

    /// [`EngineCore::add`] for a sequence whose every sampled token
    /// `constraint` must allow. Its state follows the sequence's output,
    /// which preemption by recompute keeps, so it needs no rewinding.
    pub fn add_constrained(
        &mut self,
        req: SequenceRequest,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<(), EngineError> {
        if let BackendHealth::Failed { reason } = &self.health {
            return Err(EngineError::BackendFailed(reason.clone()));
        }
        let id = req.id;
        self.scheduler.add(req)?;
        if let Some(c) = constraint {
            self.constraints.insert(id, c);
        }
        Ok(())
    }

    /// Ends a sequence now, freeing its blocks; its usage so far, if it was here.
    pub fn abort(&mut self, id: RequestId, reason: FinishReason) -> Option<Usage> {
        self.scheduler.abort(id, reason).map(|seq| seq.usage())
    }

    /// Runs one step. A backend failure ends every sequence of the step with
    /// an error output rather than leaving any of them hanging; a backend
    /// that lost its state ends every sequence it held (see
    /// [`BackendHealth`]). Nothing runs while the backend is not up.
    pub fn step(&mut self) -> Result<Vec<SeqOutput>, EngineError> {
        if self.health != BackendHealth::Up {
            return Ok(Vec::new());
        }
        let lost = self.check_backend();
        if self.health != BackendHealth::Up {
            return Ok(lost);
        }
        let started = std::time::Instant::now();
        let out = self.scheduler.schedule();
        self.last_step_tokens = out.num_scheduled_tokens;
        self.retired.extend_from_slice(&out.finished_ids);
        if out.is_empty() {
            return Ok(Vec::new());
        }
        let _span = debug_span!("step", seqs = out.num_seqs(), tokens = out.num_scheduled_tokens).entered();
        let input = input::build(&self.scheduler, &out, std::mem::take(&mut self.retired))?;
        // Grammar masks are computed on another thread while the model
        // runs: they need only the tokens so far.
        let (executed, masks) = {
            let (executor, scheduler, constraints) =
                (&mut self.executor, &self.scheduler, &mut self.constraints);
            let vocab = self.caps.vocab_size;
            std::thread::scope(|s| {
                let masks = (!constraints.is_empty())
                    .then(|| s.spawn(|| constraint_masks(scheduler, &out, constraints, vocab)));
                let executed = executor.execute(&input);
                (executed, masks.map(|h| h.join().unwrap_or_default()).unwrap_or_default())
            })
        };
        let sampled = match executed.and_then(|output| self.next_tokens(&out, output, &masks)) {
            Ok(sampled) => sampled,
            Err(e @ (ExecError::Lost(_) | ExecError::Hardware(_))) => return Ok(self.lose_backend(&e)),
            Err(e) => return Ok(self.fail(&out, &e.to_string())),
        };
        let tokens: Vec<Option<TokenId>> = sampled.iter().map(|s| s.as_ref().map(|s| s.token)).collect();
        self.advance_constraints(&out, &tokens);
        // What the step cost, for the scheduler's step-time model.
        self.scheduler.observe_step(&out, started.elapsed());
        let updates = self.scheduler.update(&out, &tokens)?;
        if !self.constraints.is_empty() {
            let scheduler = &self.scheduler;
            self.constraints.retain(|id, _| scheduler.get(*id).is_some());
        }
        let mut by_id: HashMap<RequestId, SampledToken> =
            out.batch().zip(sampled).filter_map(|((id, _), s)| Some((id, s?))).collect();
        Ok(updates
            .into_iter()
            .map(|u| SeqOutput {
                sampled: by_id.remove(&u.id),
                first_scheduled: out.new_seqs.iter().any(|n| n.id == u.id && n.first_time),
                id: u.id,
                finished: u.finished,
                usage: u.usage,
                error: None,
            })
            .collect())
    }

    /// The next token of every sequence whose scheduled tokens reach its
    /// end, in batch order (`None` for a prefill chunk that does not):
    /// sampled here from logits, or as the backend sampled it.
    fn next_tokens(
        &self,
        out: &SchedulerOutput,
        output: ModelOutput,
        masks: &HashMap<RequestId, Vec<u32>>,
    ) -> Result<Vec<Option<SampledToken>>, ExecError> {
        let mut rows = match output {
            ModelOutput::Logits(logits) => Rows::Logits { logits, next: 0 },
            ModelOutput::Sampled(tokens) => Rows::Sampled(tokens.into_iter()),
        };
        let mut next = Vec::with_capacity(out.num_seqs());
        for (id, n) in out.batch() {
            let seq = scheduled(&self.scheduler, id).map_err(|e| ExecError::Input(e.to_string()))?;
            if !reaches_end(seq, n) {
                next.push(None);
                continue;
            }
            let ctx = SampleContext {
                params: &seq.params,
                tokens: seq.tokens(),
                prompt_len: seq.prompt().len(),
                eos_token_ids: &self.eos_token_ids,
                allowed: masks.get(&id).map(Vec::as_slice),
            };
            let token =
                rows.next(&ctx).ok_or_else(|| ExecError::Backend(format!("no output row for {id}")))?;
            if token.token as usize >= self.caps.vocab_size {
                return Err(ExecError::Backend(format!(
                    "token {} for {id} is outside the vocabulary",
                    token.token
                )));
            }
            next.push(Some(token));
        }
        if !rows.is_done() {
            return Err(ExecError::Backend("more output rows than sequences to sample".into()));
        }
        Ok(next)
    }

    /// Tells each constrained sequence the token it was given.
    fn advance_constraints(&mut self, out: &SchedulerOutput, tokens: &[Option<TokenId>]) {
        if self.constraints.is_empty() {
            return;
        }
        for ((id, _), token) in out.batch().zip(tokens) {
            if let (Some(c), Some(t)) = (self.constraints.get_mut(&id), token)
                && let Err(e) = c.consume(*t)
            {
                tracing::error!(%id, error = %e, "the grammar refused a token it allowed");
            }
        }
    }

    fn fail(&mut self, out: &SchedulerOutput, message: &str) -> Vec<SeqOutput> {
        tracing::error!(error = message, seqs = out.num_seqs(), "step failed; ending its sequences");
        let ids: Vec<RequestId> = out.batch().map(|(id, _)| id).collect();
        let ended = ids.into_iter().filter_map(|id| self.scheduler.abort(id, FinishReason::Error)).collect();
        error_outputs(ended, message)
    }

    /// The backend lost every sequence's KV: ends the sequences it held
    /// (all of them after a hardware error) and forgets cached prefixes.
    fn lose_backend(&mut self, e: &ExecError) -> Vec<SeqOutput> {
        let message = e.to_string();
        let ended = match e {
            ExecError::Hardware(reason) => {
                tracing::error!(error = %message, "hardware error: this instance takes no more work");
                self.health = BackendHealth::Failed { reason: reason.clone() };
                self.scheduler.abort_all(FinishReason::Error)
            }
            _ => {
                tracing::error!(error = %message, "the backend lost its state; restarting it");
                self.health = BackendHealth::Restarting { reason: message.clone() };
                self.scheduler.backend_lost(FinishReason::Error)
            }
        };
        error_outputs(ended, &message)
    }

    /// Runs a short request through every stage before serving, so the
    /// first client does not pay for thread-pool start-up and first-touch
    /// page faults (about 0.7 s on our 2-core CPU machine). Under a
    /// step-time target a second, longer one follows, so the step-time
    /// model starts from four measured steps of different sizes rather
    /// than from none.
    pub fn warm_up(&mut self) -> Result<(), EngineError> {
        let cfg = self.scheduler.config();
        let max_len = cfg.max_model_len;
        if max_len < 4 {
            return Ok(());
        }
        let longest = (max_len - 3).min(cfg.token_budget());
        let vocab = self.caps.vocab_size as TokenId;
        let params = SamplingParams { temperature: 0.0, max_tokens: 2, ..Default::default() };
        // Ids no client gets (theirs count up from 1), each used once: the
        // backend hears of the first one's end with the second's input.
        let mut warm = vec![(0, 32.min(longest))];
        if cfg.has_step_target() {
            warm.push((u64::MAX, 128.min(longest)));
        }
        for (id, len) in warm {
            let prompt = (1..=len as TokenId).map(|t| t % vocab).collect();
            self.add(SequenceRequest::new(RequestId(id), prompt, params.clone()))?;
            self.run_to_completion()?;
        }
        Ok(())
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
