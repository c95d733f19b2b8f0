//! The contract between inferd's engine and its backends. Everything here is
//! plain data that serde can carry across a process boundary (the Neuron step
//! worker) as well as a function call (the CPU and CUDA executors):
//!
//! - [`ModelInput`]: one step's flat batch: tokens, positions, slot mapping,
//!   block tables, the padded shape for static-shape backends, and the
//!   lifecycle of sequences (started, preempted, finished) for backends that
//!   keep per-sequence state.
//! - [`ModelOutput`]: logits for the engine to sample, or tokens the backend
//!   sampled on its device.
//! - [`Capabilities`]: what a backend can run, which bounds what the
//!   scheduler plans.
//! - [`ModelExecutor`]: the trait every backend implements.
//! - [`PaddedStep`]: a step padded to a compiled bucket, as a static-shape
//!   worker receives it.
//! - [`wire`]: the framed step protocol a worker process speaks.
//!
//! No candle and no tokio: the engine and the scheduler stay free of device
//! types, and a worker in another language can speak the same messages.

mod caps;
mod device;
mod error;
mod input;
mod output;
mod padded;
pub mod wire;

pub use caps::{Capabilities, DeviceSampling, PaddedShape, ShapeBuckets};
pub use device::{DType, DeviceSpec};
pub use error::ExecError;
pub use input::{ModelInput, StartedSeq};
pub use output::{Logits, ModelOutput, SampledToken};
pub use padded::{PAD_SLOT, PAD_TOKEN, PaddedStep, Phase};

/// Runs a model over one step's batch, owning the KV cache.
pub trait ModelExecutor: Send {
    /// What this backend runs; fixed once it is built.
    fn capabilities(&self) -> Capabilities;
    /// Writes the step's K/V through the slot mapping, attends through the
    /// block tables, and returns one output row per `input.logits_rows`.
    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError>;
    /// Reports a backend that lost its state between steps (its worker
    /// exited while idle) before work is scheduled onto it. Cheap: the
    /// engine calls it before every step and about once a second while idle.
    fn check(&mut self) -> Result<(), ExecError> {
        Ok(())
    }
    /// Brings back a backend whose `execute` failed with
    /// [`ExecError::Lost`] (restarts its worker); it then holds no sequence
    /// and no cached KV. Backends that cannot lose their state refuse.
    fn recover(&mut self) -> Result<(), ExecError> {
        Err(ExecError::Unavailable("this backend cannot be restarted".into()))
    }
}

impl<E: ModelExecutor + ?Sized> ModelExecutor for Box<E> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn execute(&mut self, input: &ModelInput) -> Result<ModelOutput, ExecError> {
        (**self).execute(input)
    }
    fn check(&mut self) -> Result<(), ExecError> {
        (**self).check()
    }
    fn recover(&mut self) -> Result<(), ExecError> {
        (**self).recover()
    }
}
