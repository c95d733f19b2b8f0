//! Types shared by every inferd crate: request and token ids, sampling
//! parameters with their validation, finish reasons, usage and the events a
//! request's stream carries. Serde only: no tensors, no async runtime.

mod constraint;
mod events;
mod ids;
mod sampling;

pub use constraint::{TokenConstraint, mask_allow, mask_allows};
pub use events::{FinishReason, Logprob, StreamEvent, TokenLogprobs, Usage};
pub use ids::{RequestId, TokenId};
pub use sampling::{MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, SamplingError, SamplingParams};
