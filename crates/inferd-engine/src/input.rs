//! The engine's map from the scheduler's plan to the contract: one flat
//! [`ModelInput`] per step, read from the scheduler's sequences (the one
//! owner of tokens, blocks and computed counts).

use inferd_contract::{ModelInput, PaddedShape, ShapeBuckets, StartedSeq};
use inferd_core::RequestId;
use inferd_sched::{Scheduler, SchedulerOutput, Sequence};

use crate::EngineError;

/// True when a step that computes `n` of `seq`'s tokens reaches its last
/// token, so its next token is sampled.
pub(crate) fn reaches_end(seq: &Sequence, n: usize) -> bool {
    seq.num_computed_tokens + n == seq.num_tokens()
}

pub(crate) fn scheduled(sched: &Scheduler, id: RequestId) -> Result<&Sequence, EngineError> {
    sched.get(id).ok_or(EngineError::Inconsistent(format!("{id} was scheduled but is not in the scheduler")))
}

/// Builds the step's input. `finished` lists sequences gone since the last
/// input, so the backend can drop what it keeps for them.
pub(crate) fn build(
    sched: &Scheduler,
    out: &SchedulerOutput,
    finished: Vec<RequestId>,
) -> Result<ModelInput, EngineError> {
    let bs = sched.config().block_size;
    let mut max_blocks = 0;
    for (id, _) in out.batch() {
        max_blocks = max_blocks.max(scheduled(sched, id)?.block_table.len());
    }
    let mut input = ModelInput::new(max_blocks);
    let mut blocks = Vec::with_capacity(max_blocks);
    for (id, n) in out.batch() {
        let seq = scheduled(sched, id)?;
        let start = seq.num_computed_tokens;
        let tokens = seq.tokens().get(start..start + n).ok_or_else(|| {
            EngineError::Inconsistent(format!(
                "{id}: {n} tokens scheduled from {start} of {}",
                seq.num_tokens()
            ))
        })?;
        blocks.clear();
        blocks.extend(seq.block_table.blocks().iter().map(|b| b.index() as u32));
        input.push_seq(id, tokens, start, &blocks, bs, reaches_end(seq, n));
    }
    for n in out.new_seqs.iter().filter(|n| n.first_time) {
        let seq = scheduled(sched, n.id)?;
        input.started.push(StartedSeq {
            id: n.id,
            prompt_len: seq.prompt().len() as u32,
            params: seq.params.clone(),
        });
    }
    input.padded_shape = out.padded_shape.map(|p| PaddedShape { batch: p.batch, tokens: p.tokens });
    input.preempted.clone_from(&out.preempted_ids);
    input.finished = finished;
    Ok(input)
}

/// The scheduler's view of a backend's compiled shapes.
pub(crate) fn sched_buckets(b: &ShapeBuckets) -> inferd_sched::ShapeBuckets {
    inferd_sched::ShapeBuckets { batch_sizes: b.batch_sizes.clone(), token_counts: b.token_counts.clone() }
}
