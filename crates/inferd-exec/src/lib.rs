//! inferd's backends behind the executor contract ([`inferd_contract`]):
//! [`CpuExecutor`] runs llama-family models on the CPU with paged attention;
//! [`neuron::NeuronExecutor`] drives a compiled model in a step worker
//! process; [`FakeExecutor`] stands in for a model in tests; [`build_executor`] picks
//! the backend `--device` names; the [`sampler`] samples the logits of
//! backends that return them.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod factory;
pub mod fake;
mod live;
pub mod neuron;
pub mod sampler;

use inferd_contract::{DType, ExecError};

pub use cpu::{CpuExecutor, CpuExecutorConfig};
pub use factory::{ExecutorConfig, NeuronOptions, build_executor, check_backend};
pub use fake::{FakeControl, FakeExecutor, FakeLog};
pub use live::{LiveSeqs, device_row};

/// candle's dtype for a contract dtype.
pub fn candle_dtype(d: DType) -> candle_core::DType {
    match d {
        DType::F32 => candle_core::DType::F32,
        DType::F16 => candle_core::DType::F16,
        DType::BF16 => candle_core::DType::BF16,
    }
}

/// The contract dtype of a candle compute dtype.
pub fn contract_dtype(d: candle_core::DType) -> Result<DType, ExecError> {
    match d {
        candle_core::DType::F32 => Ok(DType::F32),
        candle_core::DType::F16 => Ok(DType::F16),
        candle_core::DType::BF16 => Ok(DType::BF16),
        other => Err(ExecError::Config(format!("unsupported compute dtype {other:?}"))),
    }
}

/// A candle failure during a step, as the contract reports it.
pub fn backend_err(e: candle_core::Error) -> ExecError {
    ExecError::Backend(e.to_string())
}

/// KV blocks of `block_bytes` that fit in `budget` bytes (at least one).
pub fn kv_blocks_in(budget: usize, block_bytes: usize) -> Result<usize, ExecError> {
    match budget.checked_div(block_bytes) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(ExecError::CacheTooSmall { budget, block_bytes }),
    }
}

/// The KV budget of a device backend, sized after the weights are loaded:
/// `utilization` of the device's `total` memory, less what is in use
/// (weights, workspace, other processes). vLLM's `--gpu-memory-utilization`.
pub fn device_kv_budget(total: usize, in_use: usize, utilization: f64) -> Result<usize, ExecError> {
    if !(utilization > 0.0 && utilization <= 1.0) {
        return Err(ExecError::Config(format!("memory utilization must be in (0, 1], got {utilization}")));
    }
    let allowed = (total as f64 * utilization) as usize;
    allowed.checked_sub(in_use).filter(|&b| b > 0).ok_or_else(|| {
        ExecError::Config(format!(
            "{in_use} bytes are in use, more than {utilization} of the device's {total} bytes: no room for a KV cache (raise --gpu-memory-utilization or use a smaller model)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_budgets_become_whole_blocks() {
        assert_eq!(kv_blocks_in(1000, 300), Ok(3));
        assert_eq!(kv_blocks_in(299, 300), Err(ExecError::CacheTooSmall { budget: 299, block_bytes: 300 }));
        assert!(kv_blocks_in(10, 0).is_err());
        let gib = 1usize << 30;
        // 80 GiB device at 0.9 with 10 GiB of weights: 62 GiB for the cache.
        assert_eq!(device_kv_budget(80 * gib, 10 * gib, 0.9), Ok(62 * gib));
        assert!(device_kv_budget(80 * gib, 75 * gib, 0.9).unwrap_err().to_string().contains("no room"));
        assert!(device_kv_budget(80 * gib, 0, 1.5).is_err());
        assert!(device_kv_budget(80 * gib, 0, 0.0).is_err());
        assert!(device_kv_budget(80 * gib, 0, f64::NAN).is_err());
    }
}
