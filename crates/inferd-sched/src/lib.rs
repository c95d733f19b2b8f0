//! Continuous batching in the style of vLLM v1: every step has one token
//! budget shared by running and waiting sequences, with no prefill or decode
//! phases. Chunked prefill falls out of `min(remaining, budget)`, prefix-cache
//! hits count as computed tokens, and a step that runs out of KV blocks
//! preempts the most recently admitted sequence by recompute. Backends that
//! run only compiled shapes get [`StepPolicy::Compiled`] instead: whole
//! prefills or decodes, padded to a bucket, KV reserved up front.
//! Under a step-time target (`max_step`), prefill chunks that share a step
//! with decoding sequences are sized by a cost model fitted to the engine's
//! measured steps, so a long prompt cannot stall every stream.
//!
//! The scheduler knows tokens, blocks and budgets, never a tensor.

mod config;
mod error;
mod output;
mod scheduler;
mod sequence;
mod step_cost;
mod waiting;

pub use config::{SchedulerConfig, ShapeBuckets, StepPolicy};
pub use error::SchedError;
pub use output::{NewSeq, PaddedShape, RunningSeq, SchedulerOutput, SeqUpdate};
pub use scheduler::{MIN_PREFILL_CHUNK, Scheduler, SchedulerStats};
pub use sequence::{SeqStatus, Sequence, SequenceRequest};
pub use step_cost::{StepCostModel, StepShape};
