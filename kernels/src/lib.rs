//! inferd's CUDA kernels and the host-side arithmetic around them.
//!
//! The CUDA sources in `cuda/` (cache write; paged attention as a simple
//! warp-per-head kernel, a split-K decode path with its merge, and a tiled
//! tensor-core kernel) are compiled by `build.rs` into one fatbin, only with
//! the `cuda` feature. Everything here that is plain arithmetic (which
//! kernel a step takes and how it is launched, the one buffer of step
//! metadata uploaded per step, the query tiles, the split-K merge) is
//! ordinary Rust, built and unit-tested on machines without a GPU.

mod merge;
mod meta;
mod plan;
mod sample;

pub use merge::{Partial, attend_segment, merge_partials};
pub use meta::{StepMeta, query_tiles};
pub use plan::{
    AttentionPlan, AttnArgs, AttnShape, Launch, SPLIT_MIN_CONTEXT, SPLIT_SEGMENT, kernel_name,
    plan_attention, tiled_rows, tiled_smem_bytes, tiled_warps,
};
pub use sample::{MAX_TOP_K, RowSample, SAMPLE_KERNEL, SAMPLE_THREADS, kept_distribution};

/// The kernels of `cuda/inferd_kernels.cu`, compiled for sm_80, sm_86,
/// sm_89, sm_90 and PTX.
#[cfg(feature = "cuda")]
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/inferd_kernels.fatbin"));
