use thiserror::Error;

/// Errors of model execution.
#[derive(Debug, Error)]
pub enum ExecError {
    #[error("model execution failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid model input: {0}")]
    Input(String),
    #[error("KV cache budget of {budget} bytes holds no block of {block_bytes} bytes")]
    CacheTooSmall { budget: usize, block_bytes: usize },
}
