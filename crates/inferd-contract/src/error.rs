use thiserror::Error;

/// Errors of a backend: building it, or running one step.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExecError {
    /// The input broke an invariant of the contract (a bug in the engine).
    #[error("invalid model input: {0}")]
    Input(String),
    /// The backend lost the state of every sequence it held (its worker
    /// died, hung or was restarted); `ModelExecutor::recover` may bring it
    /// back empty.
    #[error("the backend lost its state: {0}")]
    Lost(String),
    /// The device reported a hardware error: this instance should be
    /// replaced, not retried.
    #[error("the device failed: {0}")]
    Hardware(String),
    /// The device or the model failed while running a step.
    #[error("model execution failed: {0}")]
    Backend(String),
    /// The memory given to the KV cache holds not even one block.
    #[error("KV cache budget of {budget} bytes holds no block of {block_bytes} bytes")]
    CacheTooSmall { budget: usize, block_bytes: usize },
    /// The model's files could not be loaded onto the backend.
    #[error("cannot load the model: {0}")]
    Load(String),
    /// The backend's settings are inconsistent (dtype it cannot run, bad sizes).
    #[error("invalid backend config: {0}")]
    Config(String),
    /// The backend is not in this build, or its device is not there.
    #[error("{0}")]
    Unavailable(String),
}
