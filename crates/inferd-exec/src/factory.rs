//! Building the backend `--device` names. The engine thread calls
//! [`build_executor`], so a device context is created on the thread that
//! uses it; each backend is one match arm here, compiled in by its cargo
//! feature.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;
use inferd_contract::{DType, DeviceSpec, ExecError, ModelExecutor};
use inferd_models::{LoadOptions, WeightFormat, load_weights};

use crate::candle_dtype;
use crate::cpu::{CPU_DTYPES, CpuExecutor, CpuExecutorConfig};

/// Everything needed to build a backend, as the command line gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorConfig {
    pub device: DeviceSpec,
    /// A GGUF file or a Hugging Face folder.
    pub model_path: PathBuf,
    /// Weight format on the CPU (`--cpu-weights`).
    pub weight_format: WeightFormat,
    /// Weight format on a GPU (`--gpu-weights`): `native` keeps GGUF
    /// quantizations for candle's quantized CUDA kernels, `dense` takes the
    /// compute dtype for cuBLAS.
    pub gpu_weight_format: WeightFormat,
    /// The compute dtype; `None` takes the backend's default (f32 on the
    /// CPU, bf16 on devices).
    pub dtype: Option<DType>,
    /// The KV cache's dtype; `None` follows the compute dtype.
    pub kv_dtype: Option<DType>,
    pub block_size: usize,
    /// Bytes of host memory for the KV cache (CPU).
    pub kv_cache_memory: usize,
    /// Fraction of device memory the backend may fill, weights included;
    /// the KV cache takes what the weights leave (CUDA, Neuron).
    pub gpu_memory_utilization: f64,
    /// Longest sequence served; `None` takes the model's own context.
    pub max_model_len: Option<usize>,
    /// The Neuron step worker.
    pub neuron: NeuronOptions,
}

/// How `--device neuron` finds and supervises its step worker.
#[derive(Debug, Clone, PartialEq)]
pub struct NeuronOptions {
    /// The worker's command line, program first.
    pub worker: Vec<String>,
    /// The compiled artifacts.
    pub model_dir: Option<PathBuf>,
    pub step_timeout: Duration,
    pub load_timeout: Duration,
}

impl Default for NeuronOptions {
    fn default() -> Self {
        NeuronOptions {
            worker: vec!["python3".into(), "/opt/inferd/neuron/worker.py".into()],
            model_dir: None,
            step_timeout: Duration::from_secs(30),
            load_timeout: Duration::from_secs(600),
        }
    }
}

/// The compute dtype a backend runs unless told otherwise.
pub fn default_dtype(device: DeviceSpec) -> DType {
    match device {
        DeviceSpec::Cpu => DType::F32,
        DeviceSpec::Cuda(_) | DeviceSpec::Neuron => DType::BF16,
    }
}

/// Fails unless this build can run `device` (checked at start, before the
/// model loads, so a wrong build says so at once).
pub fn check_backend(device: DeviceSpec) -> Result<(), ExecError> {
    match device {
        DeviceSpec::Cpu => Ok(()),
        DeviceSpec::Cuda(n) => cuda_available(n),
        // The worker holds the Neuron runtime; this process never links it.
        DeviceSpec::Neuron => Ok(()),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_available(n: usize) -> Result<(), ExecError> {
    Err(ExecError::Unavailable(format!(
        "--device cuda:{n}: this inferd was built without the CUDA backend; build it with the `cuda` cargo feature (`cargo build --release -p inferd-server --features cuda`, see README)"
    )))
}

#[cfg(feature = "cuda")]
fn cuda_available(_: usize) -> Result<(), ExecError> {
    // Whether the GPU is there is known when the executor is built.
    Ok(())
}

/// The compute dtype for `cfg`, refused unless the backend runs it.
fn pick_dtype(cfg: &ExecutorConfig, supported: &[DType]) -> Result<DType, ExecError> {
    let dtype = cfg.dtype.unwrap_or(default_dtype(cfg.device));
    if !supported.contains(&dtype) {
        let names: Vec<&str> = supported.iter().map(|d| d.as_str()).collect();
        return Err(ExecError::Config(format!(
            "--device {} does not compute in {dtype} (supported: {})",
            cfg.device,
            names.join(", ")
        )));
    }
    Ok(dtype)
}

/// Loads the model onto `cfg.device` and builds its executor.
pub fn build_executor(cfg: &ExecutorConfig) -> Result<Box<dyn ModelExecutor>, ExecError> {
    check_backend(cfg.device)?;
    match cfg.device {
        DeviceSpec::Cpu => Ok(Box::new(build_cpu(cfg)?)),
        DeviceSpec::Neuron => Ok(Box::new(build_neuron(cfg)?)),
        // Added by the CUDA backend; check_backend refused above.
        DeviceSpec::Cuda(_) => Err(ExecError::Unavailable(format!("no executor for {}", cfg.device))),
    }
}

fn build_neuron(cfg: &ExecutorConfig) -> Result<crate::neuron::NeuronExecutor, ExecError> {
    let n = &cfg.neuron;
    let model_dir = n.model_dir.clone().ok_or_else(|| {
        ExecError::Config("--device neuron needs --neuron-model-dir, the folder of the compiled model".into())
    })?;
    if n.worker.is_empty() {
        return Err(ExecError::Config("--neuron-worker is empty".into()));
    }
    crate::neuron::NeuronExecutor::start(crate::neuron::NeuronConfig {
        worker: n.worker.clone(),
        model_dir,
        model_path: cfg.model_path.clone(),
        max_model_len: cfg.max_model_len,
        step_timeout: n.step_timeout,
        load_timeout: n.load_timeout,
    })
}

/// The CPU's KV cache dtype for `--kv-cache-dtype auto`: f16 when computing
/// in f32, else the compute dtype. Decode attention reads every cached key
/// and value each step, so at 32 streams it waits on memory: f16 halves the
/// bytes (and the memory per token, as llama.cpp's default cache does), and
/// served 17 % more tokens/s than f32 on an AVX2 EPYC. The cost, measured
/// by the SmolLM2 tests: mean KL divergence from f32 arithmetic 0.0028 nats
/// against the f32 cache's 0.0025.
fn cpu_kv_dtype(compute: DType) -> DType {
    if compute == DType::F32 { DType::F16 } else { compute }
}

fn build_cpu(cfg: &ExecutorConfig) -> Result<CpuExecutor, ExecError> {
    let dtype = pick_dtype(cfg, &CPU_DTYPES)?;
    let opts = LoadOptions {
        format: cfg.weight_format,
        dtype: candle_dtype(dtype),
        max_positions: cfg.max_model_len,
        device: Device::Cpu,
    };
    let model = load_weights(&cfg.model_path, &opts)
        .map_err(|e| ExecError::Load(format!("{}: {e}", cfg.model_path.display())))?;
    let max_model_len = cfg.max_model_len.unwrap_or(model.config().max_position_embeddings);
    CpuExecutor::new(
        model,
        CpuExecutorConfig {
            block_size: cfg.block_size,
            kv_cache_memory: cfg.kv_cache_memory,
            kv_dtype: cfg.kv_dtype.unwrap_or(cpu_kv_dtype(dtype)),
            max_model_len,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(device: DeviceSpec, dtype: Option<DType>) -> ExecutorConfig {
        ExecutorConfig {
            device,
            model_path: "no-such-model.gguf".into(),
            weight_format: WeightFormat::Native,
            gpu_weight_format: WeightFormat::Native,
            dtype,
            kv_dtype: None,
            block_size: 16,
            kv_cache_memory: 1 << 20,
            gpu_memory_utilization: 0.9,
            max_model_len: None,
            neuron: NeuronOptions::default(),
        }
    }

    #[test]
    fn devices_this_build_lacks_are_refused_naming_the_feature() {
        assert_eq!(check_backend(DeviceSpec::Cpu), Ok(()));
        let cuda = check_backend(DeviceSpec::Cuda(1));
        if cfg!(feature = "cuda") {
            assert_eq!(cuda, Ok(()), "a cuda build finds out about the GPU when it builds the executor");
        } else {
            let cuda = cuda.unwrap_err().to_string();
            assert!(cuda.contains("cuda:1") && cuda.contains("`cuda`"), "{cuda}");
        }
        assert_eq!(check_backend(DeviceSpec::Neuron), Ok(()), "the worker process holds the Neuron runtime");
        let built = build_executor(&config(DeviceSpec::Neuron, None)).map(|_| ()).unwrap_err();
        assert!(
            matches!(built, ExecError::Config(ref m) if m.contains("--neuron-model-dir")),
            "the factory refuses before starting anything: {built}"
        );
    }

    #[test]
    fn dtypes_default_per_backend_and_are_checked() {
        assert_eq!(pick_dtype(&config(DeviceSpec::Cpu, None), &CPU_DTYPES), Ok(DType::F32));
        assert_eq!(default_dtype(DeviceSpec::Cuda(0)), DType::BF16);
        let err = pick_dtype(&config(DeviceSpec::Cuda(0), Some(DType::F16)), &[DType::BF16]).unwrap_err();
        assert!(err.to_string().contains("supported: bf16"), "{err}");
        let missing = build_executor(&config(DeviceSpec::Cpu, None)).map(|_| ()).unwrap_err();
        assert!(matches!(missing, ExecError::Load(ref m) if m.contains("no-such-model.gguf")), "{missing}");
    }
}
