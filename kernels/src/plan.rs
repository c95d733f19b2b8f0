//! Which attention kernel a step takes, and its launch dimensions.

use inferd_contract::DType;

/// Decode contexts at least this long are split over several blocks when
/// the batch alone would leave the GPU idle.
pub const SPLIT_MIN_CONTEXT: u32 = 1024;
/// Key positions per split-K segment (before capping the segment count).
pub const SPLIT_SEGMENT: u32 = 512;
/// Most split-K segments per token.
const MAX_SEGMENTS: u32 = 64;

/// The attention shapes of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
}

impl AttnShape {
    /// Query heads per KV head.
    pub fn group(&self) -> u32 {
        self.num_heads / self.num_kv_heads
    }

    /// Checks what the kernels support: head dims 64 and 128, whole GQA
    /// groups of at most 32 heads, block sizes that whole key tiles fit.
    pub fn validate(&self) -> Result<(), String> {
        if self.head_dim != 64 && self.head_dim != 128 {
            return Err(format!(
                "the CUDA kernels support head dims 64 and 128, this model has {}",
                self.head_dim
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) || self.group() > 32 {
            return Err(format!(
                "{} query heads over {} KV heads: the CUDA kernels need whole groups of at most 32",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.block_size == 0 || !self.block_size.is_multiple_of(16) {
            return Err(format!(
                "the CUDA kernels need a block size that is a multiple of 16, got {}",
                self.block_size
            ));
        }
        Ok(())
    }
}

/// The kernels' `AttnArgs` (cuda/attention_simple.cuh), passed by value:
/// the same fields in the same order, in C layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnArgs {
    /// Elements between consecutive tokens of q.
    pub q_stride: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub block_size: u32,
    /// Width of a block-table row.
    pub max_blocks: u32,
    pub scale: f32,
}

/// How one step's attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPlan {
    /// A warp per (token, query head); any dtype, any batch.
    Simple,
    /// Decode over long contexts: `segments` blocks per (token, KV head),
    /// each over `seg_len` positions, then a merge.
    Split { segments: u32, seg_len: u32 },
    /// Tensor cores over query tiles (f16 and bf16; steps with a prefill).
    Tiled { warps: u32 },
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// Warps per tiled block: 4 for head dim 64, 2 for 128 (about 35 KB of
/// shared memory either way).
pub fn tiled_warps(head_dim: u32) -> u32 {
    256 / head_dim
}

/// Query rows (token x group head) one tiled block serves.
pub fn tiled_rows(head_dim: u32) -> u32 {
    16 * tiled_warps(head_dim)
}

/// Shared memory of a tiled block; `cuda/attention_tiled.cuh` computes the
/// same (a static_assert in the .cu pins both).
pub fn tiled_smem_bytes(elem_bytes: u32, head_dim: u32, warps: u32) -> u32 {
    let m = 16 * warps;
    m * head_dim * elem_bytes
        + 2 * 16 * head_dim * elem_bytes
        + warps * 256 * 4
        + warps * 256 * elem_bytes
        + m * head_dim * 4
}

/// Picks the kernel for a step: tensor cores when a half-precision step
/// holds a prefill; split-K when a decode step has long contexts and too
/// few (token, KV head) pairs to fill `sm_count` multiprocessors; otherwise
/// the simple kernel.
pub fn plan_attention(
    dtype: DType,
    shape: &AttnShape,
    num_tokens: u32,
    max_query_len: u32,
    max_context_len: u32,
    sm_count: u32,
) -> AttentionPlan {
    if dtype != DType::F32 && max_query_len > 1 {
        return AttentionPlan::Tiled { warps: tiled_warps(shape.head_dim) };
    }
    let blocks = num_tokens * shape.num_kv_heads;
    if max_query_len <= 1 && max_context_len >= SPLIT_MIN_CONTEXT && blocks < 2 * sm_count {
        let segments = max_context_len.div_ceil(SPLIT_SEGMENT).min(MAX_SEGMENTS);
        return AttentionPlan::Split { segments, seg_len: max_context_len.div_ceil(segments) };
    }
    AttentionPlan::Simple
}

impl AttentionPlan {
    /// The launch of the attention kernel (for `Split`, the segment kernel;
    /// the merge is [`AttentionPlan::merge_launch`]). `num_tiles` is the
    /// number of query tiles ([`crate::query_tiles`]) for `Tiled`.
    pub fn launch(&self, shape: &AttnShape, elem_bytes: u32, num_tokens: u32, num_tiles: u32) -> Launch {
        let warps_per_head = (shape.group() * 32, 1, 1);
        match *self {
            AttentionPlan::Simple => Launch {
                grid: (num_tokens, shape.num_kv_heads, 1),
                block: warps_per_head,
                shared_mem_bytes: 0,
            },
            AttentionPlan::Split { segments, .. } => Launch {
                grid: (num_tokens, shape.num_kv_heads, segments),
                block: warps_per_head,
                shared_mem_bytes: 0,
            },
            AttentionPlan::Tiled { warps } => Launch {
                grid: (num_tiles, shape.num_kv_heads, 1),
                block: (warps * 32, 1, 1),
                shared_mem_bytes: tiled_smem_bytes(elem_bytes, shape.head_dim, warps),
            },
        }
    }

    /// The merge launch of a split step: a warp per (token, query head).
    pub fn merge_launch(&self, shape: &AttnShape, num_tokens: u32) -> Option<Launch> {
        matches!(self, AttentionPlan::Split { .. }).then_some(Launch {
            grid: (num_tokens, shape.num_heads, 1),
            block: (32, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// f32 elements of the split-K workspace: `[max, sum, acc[D]]` per
    /// (token, query head, segment).
    pub fn workspace_len(&self, shape: &AttnShape, num_tokens: u32) -> usize {
        match *self {
            AttentionPlan::Split { segments, .. } => {
                num_tokens as usize
                    * shape.num_heads as usize
                    * segments as usize
                    * (shape.head_dim as usize + 2)
            }
            _ => 0,
        }
    }
}

/// The entry point of `kind` ("cache_write", "attention_simple",
/// "attention_split", "attention_merge", "attention_tiled") for a dtype and
/// head dim, as `cuda/inferd_kernels.cu` names it.
pub fn kernel_name(kind: &str, dtype: DType, head_dim: u32) -> String {
    let dt = dtype.as_str();
    if kind == "cache_write" {
        format!("inferd_cache_write_{dt}")
    } else {
        format!("inferd_{kind}_{dt}_d{head_dim}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: AttnShape = AttnShape { num_heads: 9, num_kv_heads: 3, head_dim: 64, block_size: 16 };
    const LLAMA8B: AttnShape = AttnShape { num_heads: 32, num_kv_heads: 8, head_dim: 128, block_size: 16 };

    #[test]
    fn attn_args_have_the_c_layout() {
        assert_eq!(std::mem::size_of::<AttnArgs>(), 24);
        assert_eq!(std::mem::align_of::<AttnArgs>(), 4);
        let a =
            AttnArgs { q_stride: 1, num_heads: 2, num_kv_heads: 3, block_size: 4, max_blocks: 5, scale: 0.5 };
        // SAFETY: AttnArgs is repr(C) with six 4-byte fields and no padding.
        let words: [u32; 6] = unsafe { std::mem::transmute(a) };
        assert_eq!(words, [1, 2, 3, 4, 5, 0.5f32.to_bits()]);
    }

    #[test]
    fn shapes_outside_the_kernels_are_refused() {
        assert!(SMOL.validate().is_ok() && LLAMA8B.validate().is_ok());
        assert!(AttnShape { head_dim: 96, ..SMOL }.validate().unwrap_err().contains("64 and 128"));
        assert!(AttnShape { num_heads: 10, ..SMOL }.validate().unwrap_err().contains("whole groups"));
        assert!(AttnShape { num_heads: 64, num_kv_heads: 1, ..SMOL }.validate().is_err(), "group of 64");
        assert!(AttnShape { block_size: 8, ..SMOL }.validate().unwrap_err().contains("multiple of 16"));
    }

    #[test]
    fn steps_pick_their_kernel() {
        use AttentionPlan::*;
        // A prefill in half precision takes the tensor cores.
        assert_eq!(plan_attention(DType::BF16, &SMOL, 300, 300, 300, 132), Tiled { warps: 4 });
        assert_eq!(plan_attention(DType::F16, &LLAMA8B, 40, 33, 900, 132), Tiled { warps: 2 });
        // f32 has no tensor-core path.
        assert_eq!(plan_attention(DType::F32, &SMOL, 300, 300, 300, 132), Simple);
        // Short decode, or a batch that fills the GPU: simple.
        assert_eq!(plan_attention(DType::BF16, &LLAMA8B, 4, 1, 512, 132), Simple);
        assert_eq!(
            plan_attention(DType::BF16, &LLAMA8B, 64, 1, 8192, 132),
            Simple,
            "512 blocks fill 132 SMs"
        );
        // One long decode: split into 512-position segments.
        assert_eq!(
            plan_attention(DType::BF16, &LLAMA8B, 1, 1, 4000, 132),
            Split { segments: 8, seg_len: 500 }
        );
        // Capped at 64 segments: longer ones each take more positions.
        let Split { segments, seg_len } = plan_attention(DType::BF16, &LLAMA8B, 1, 1, 100_000, 132) else {
            panic!("split expected")
        };
        assert_eq!(segments, 64);
        assert!(segments * seg_len >= 100_000);
    }

    #[test]
    fn launches_follow_the_plan() {
        let simple = AttentionPlan::Simple.launch(&SMOL, 2, 10, 0);
        assert_eq!((simple.grid, simple.block), ((10, 3, 1), (96, 1, 1)));
        let split = AttentionPlan::Split { segments: 8, seg_len: 500 };
        assert_eq!(split.launch(&LLAMA8B, 2, 1, 0).grid, (1, 8, 8));
        assert_eq!(split.merge_launch(&LLAMA8B, 1).map(|l| l.grid), Some((1, 32, 1)));
        assert_eq!(split.workspace_len(&LLAMA8B, 1), 32 * 8 * 130);
        let tiled = AttentionPlan::Tiled { warps: 2 }.launch(&LLAMA8B, 2, 40, 7);
        assert_eq!((tiled.grid, tiled.block, tiled.shared_mem_bytes), ((7, 8, 1), (64, 1, 1), 35840));
        assert_eq!(tiled_smem_bytes(2, 64, 4), 34816, "the sizes the .cu asserts");
        assert!(tiled_smem_bytes(2, 128, 2) <= 48 * 1024 && tiled_smem_bytes(2, 64, 4) <= 48 * 1024);
        assert_eq!(kernel_name("attention_tiled", DType::BF16, 128), "inferd_attention_tiled_bf16_d128");
        assert_eq!(kernel_name("cache_write", DType::F16, 64), "inferd_cache_write_f16");
    }
}
