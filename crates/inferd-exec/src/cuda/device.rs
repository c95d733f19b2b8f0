//! The GPU side of the CUDA executor: inferd's kernels loaded from the
//! embedded fatbin, device facts, and raw addresses of candle tensors.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUdeviceptr};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::{DType as CandleDType, Device, Storage, Tensor};
use inferd_contract::{DType, ExecError};
use inferd_kernels::{AttnArgs, Launch, RowSample, SAMPLE_THREADS, kernel_name};

/// What the GPU is, for logs, /stats and the GPU check.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuFacts {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub sm_count: u32,
    pub total_memory: usize,
}

impl GpuFacts {
    pub(crate) fn read(stream: &CudaStream) -> Result<Self, ExecError> {
        let ctx = stream.context();
        let attr = |a| ctx.attribute(a).map_err(driver_err);
        Ok(GpuFacts {
            name: ctx.name().map_err(driver_err)?,
            compute_capability: (
                attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ),
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            total_memory: ctx.total_mem().map_err(driver_err)?,
        })
    }
}

pub(crate) fn driver_err(e: impl std::fmt::Display) -> ExecError {
    ExecError::Backend(format!("CUDA: {e}"))
}

/// The kernels for one compute dtype and head dim.
#[derive(Debug)]
pub(crate) struct Kernels {
    pub cache_write: CudaFunction,
    pub simple: CudaFunction,
    pub split: CudaFunction,
    pub merge: CudaFunction,
    /// Tensor cores; f16 and bf16 only.
    pub tiled: Option<CudaFunction>,
    /// Sampling rows of f32 logits.
    pub sample: CudaFunction,
}

impl Kernels {
    pub(crate) fn load(stream: &CudaStream, dtype: DType, head_dim: u32) -> Result<Self, ExecError> {
        let module = stream
            .context()
            .load_module(Ptx::from_binary(inferd_kernels::FATBIN.to_vec()))
            .map_err(|e| ExecError::Unavailable(format!("cannot load inferd's CUDA kernels: {e}")))?;
        let get = |kind: &str| {
            let name = kernel_name(kind, dtype, head_dim);
            module.load_function(&name).map_err(|e| ExecError::Unavailable(format!("kernel {name}: {e}")))
        };
        Ok(Kernels {
            cache_write: get("cache_write")?,
            simple: get("attention_simple")?,
            split: get("attention_split")?,
            merge: get("attention_merge")?,
            tiled: if dtype == DType::F32 { None } else { Some(get("attention_tiled")?) },
            sample: module.load_function(inferd_kernels::SAMPLE_KERNEL).map_err(|e| {
                ExecError::Unavailable(format!("kernel {}: {e}", inferd_kernels::SAMPLE_KERNEL))
            })?,
        })
    }
}

/// The kernels' AttnArgs as a kernel argument.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct DevArgs(pub AttnArgs);

// SAFETY: AttnArgs is repr(C) plain data (six 4-byte fields), the layout the
// kernels declare (tested in inferd-kernels).
unsafe impl DeviceRepr for DevArgs {}

/// The device address of `t`'s first element. The caller keeps `t` alive
/// until the kernels reading it are queued; everything runs on candle's one
/// stream, so stream order covers the reads and writes.
pub(crate) fn addr(t: &Tensor, stream: &CudaStream) -> Result<CUdeviceptr, ExecError> {
    fn of<T>(s: &CudaSlice<T>, offset: usize, stream: &CudaStream) -> CUdeviceptr {
        let (ptr, _sync) = s.device_ptr(stream);
        ptr + (offset * std::mem::size_of::<T>()) as CUdeviceptr
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(ExecError::Backend("a tensor of the CUDA executor is not on the GPU".into()));
    };
    let off = layout.start_offset();
    let e = |e: candle_core::Error| ExecError::Backend(e.to_string());
    Ok(match t.dtype() {
        CandleDType::F32 => of(cs.as_cuda_slice::<f32>().map_err(e)?, off, stream),
        CandleDType::F16 => of(cs.as_cuda_slice::<half::f16>().map_err(e)?, off, stream),
        CandleDType::BF16 => of(cs.as_cuda_slice::<half::bf16>().map_err(e)?, off, stream),
        CandleDType::U32 => of(cs.as_cuda_slice::<u32>().map_err(e)?, off, stream),
        other => return Err(ExecError::Backend(format!("unexpected dtype {other:?} on the GPU"))),
    })
}

/// The device address of a raw buffer.
pub(crate) fn buf_addr(s: &CudaSlice<u8>, stream: &CudaStream) -> CUdeviceptr {
    let (ptr, _sync) = s.device_ptr(stream);
    ptr
}

/// One kernel argument, by value.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Ptr(CUdeviceptr),
    U32(u32),
    Args(DevArgs),
}

/// Queues `func` on `stream` with `args`.
pub(crate) fn launch(
    stream: &Arc<CudaStream>,
    func: &CudaFunction,
    l: Launch,
    args: &[Arg],
) -> Result<(), ExecError> {
    let mut b = stream.launch_builder(func);
    for a in args {
        match a {
            Arg::Ptr(p) => b.arg(p),
            Arg::U32(x) => b.arg(x),
            Arg::Args(x) => b.arg(x),
        };
    }
    let cfg = LaunchConfig { grid_dim: l.grid, block_dim: l.block, shared_mem_bytes: l.shared_mem_bytes };
    // SAFETY: the argument lists match the kernels' signatures in
    // kernels/cuda/inferd_kernels.cu (one call site per kernel, in
    // attention.rs), every address points into a live allocation of the
    // size the launch dimensions imply, checked by ModelInput::validate.
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(driver_err)
}

/// Draws each row's token from `logits` (`(rows, vocab)`) on the GPU and
/// copies the ids back: one block per row (kernels/cuda/sample.cuh).
pub(crate) fn sample_rows(
    device: &Device,
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    logits: &Tensor,
    rows: &[RowSample],
) -> Result<Vec<u32>, ExecError> {
    let cerr = |e: candle_core::Error| ExecError::Backend(e.to_string());
    let words: Vec<u32> = rows.iter().flat_map(RowSample::to_words).collect();
    let params = Tensor::from_slice(&words, words.len(), device).map_err(cerr)?;
    let logits = logits.to_dtype(CandleDType::F32).and_then(|l| l.contiguous()).map_err(cerr)?;
    let out = Tensor::zeros(rows.len(), CandleDType::U32, device).map_err(cerr)?;
    let l = Launch { grid: (rows.len() as u32, 1, 1), block: (SAMPLE_THREADS, 1, 1), shared_mem_bytes: 0 };
    let vocab = logits.dim(1).map_err(cerr)? as u32;
    let args = [
        Arg::Ptr(addr(&logits, stream)?),
        Arg::U32(vocab),
        Arg::Ptr(addr(&params, stream)?),
        Arg::Ptr(addr(&out, stream)?),
    ];
    launch(stream, &kernels.sample, l, &args)?;
    out.to_vec1::<u32>().map_err(cerr)
}
