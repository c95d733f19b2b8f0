use inferd_core::{FinishReason, RequestId, TokenId, Usage};

/// A sequence admitted this step: for the first time, or again after a
/// preemption. Its tokens, blocks and parameters stay with the scheduler's
/// [`Sequence`](crate::Sequence), their one owner; `Scheduler::get` reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSeq {
    pub id: RequestId,
    /// Tokens whose KV is already cached (prefix-cache hits).
    pub num_computed_tokens: usize,
    pub num_scheduled_tokens: usize,
    /// False when it resumes after a preemption.
    pub first_time: bool,
}

/// A sequence that ran last step too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningSeq {
    pub id: RequestId,
    pub num_computed_tokens: usize,
    pub num_scheduled_tokens: usize,
}

/// The compiled shape a static-shape backend pads this step to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaddedShape {
    pub batch: usize,
    pub tokens: usize,
}

/// One step's plan. The batch order is `running_seqs` then `new_seqs`.
#[derive(Debug, Clone, Default)]
pub struct SchedulerOutput {
    pub running_seqs: Vec<RunningSeq>,
    pub new_seqs: Vec<NewSeq>,
    /// Sequences that finished or were aborted since the last schedule: the
    /// executor drops whatever it keeps for them.
    pub finished_ids: Vec<RequestId>,
    /// Sequences preempted this step: their blocks are gone, and they will
    /// come back as new sequences (`first_time` false).
    pub preempted_ids: Vec<RequestId>,
    pub num_scheduled_tokens: usize,
    pub padded_shape: Option<PaddedShape>,
}

impl SchedulerOutput {
    /// `(id, tokens scheduled)` for each sequence, in batch order.
    pub fn batch(&self) -> impl Iterator<Item = (RequestId, usize)> + '_ {
        let running = self.running_seqs.iter().map(|s| (s.id, s.num_scheduled_tokens));
        running.chain(self.new_seqs.iter().map(|s| (s.id, s.num_scheduled_tokens)))
    }

    /// Sequences scheduled this step.
    pub fn num_seqs(&self) -> usize {
        self.running_seqs.len() + self.new_seqs.len()
    }

    /// True when nothing runs this step.
    pub fn is_empty(&self) -> bool {
        self.num_seqs() == 0
    }
}

/// What one step did to one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqUpdate {
    pub id: RequestId,
    /// The token sampled for it; `None` for a prefill chunk that did not
    /// reach the end of its prompt.
    pub token: Option<TokenId>,
    /// Set when this token ended the sequence.
    pub finished: Option<FinishReason>,
    /// Token accounting after this step.
    pub usage: Usage,
}
