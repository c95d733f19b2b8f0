//! The engine: one owner of the scheduler, the executor and the batch state,
//! advancing every sequence one step at a time, on a thread of its own.

mod core;
pub mod metrics;
mod thread;

pub use core::{EngineConfig, EngineCore, EngineError, SeqOutput};
pub use thread::{EngineGone, EngineHandle, EngineStats};
