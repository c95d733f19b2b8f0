//! Model execution for inferd. [`ModelExecutor`] is the one seam between the
//! engine and a device: it takes a flat [`ModelInput`] (token ids, positions,
//! slot mapping, block tables) and returns logits. [`BatchState`] turns the
//! scheduler's plans into those inputs and samples the next tokens;
//! [`CpuExecutor`] runs llama-family models on the CPU with paged attention.

mod batch;
pub mod cpu;
mod error;
mod executor;
mod input;
pub mod sampler;

pub use batch::{BatchState, Sampled};
pub use cpu::{CpuExecutor, CpuExecutorConfig, KvDtype};
pub use error::ExecError;
pub use executor::{Capabilities, ModelExecutor, ModelOutput};
pub use input::ModelInput;
