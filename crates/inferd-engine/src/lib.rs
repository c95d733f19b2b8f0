//! The engine: one owner of the scheduler, the executor and the batch state,
//! advancing every sequence one step at a time.

mod core;

pub use core::{EngineConfig, EngineCore, EngineError, SeqOutput};
