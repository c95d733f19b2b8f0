//! The engine: one owner of the scheduler and the executor, advancing every
//! sequence one step at a time, on a thread of its own. It maps the
//! scheduler's plan to the executor contract ([`inferd_contract`]) and
//! samples the logits of backends that return them.

mod core;
mod input;
pub mod metrics;
mod thread;

pub use core::{BackendHealth, EngineConfig, EngineCore, EngineError, SeqOutput};
pub use thread::{BackendStatus, EngineGone, EngineHandle, EngineStats};
