// inferd's CUDA kernels: one translation unit, built by kernels/build.rs into
// one fatbin (SASS for sm_80, sm_86, sm_89, sm_90 and PTX for newer GPUs).
// Entry points are extern "C" so the executor finds them by name:
//   inferd_cache_write_<dt>
//   inferd_attention_simple_<dt>_d<D>, inferd_attention_split_<dt>_d<D>,
//   inferd_attention_merge_<dt>_d<D>, inferd_attention_tiled_<dt>_d<D> (f16, bf16)
//   inferd_sample_rows (f32 logits)
// with <dt> in f32, f16, bf16 and <D> in 64, 128.

#include "attention_simple.cuh"
#include "attention_tiled.cuh"
#include "cache_write.cuh"
#include "sample.cuh"

using inferd::AttnArgs;
typedef __half f16;
typedef __nv_bfloat16 bf16;
typedef float f32;

#define CACHE_WRITE(dt)                                                                                   \
  extern "C" __global__ void inferd_cache_write_##dt(const dt* k, const dt* v, dt* k_cache, dt* v_cache,   \
                                                     const uint32_t* slot_mapping, uint32_t row,           \
                                                     uint32_t k_stride, uint32_t v_stride) {               \
    inferd::cache_write<dt>(k, v, k_cache, v_cache, slot_mapping, row, k_stride, v_stride);               \
  }

#define ATTENTION(dt, D)                                                                                  \
  extern "C" __global__ void inferd_attention_simple_##dt##_d##D(                                         \
      dt* out, const dt* q, const dt* k_cache, const dt* v_cache, const uint32_t* token_seq,              \
      const uint32_t* positions, const uint32_t* block_tables, AttnArgs a) {                              \
    inferd::attention_simple<dt, D>(out, q, k_cache, v_cache, token_seq, positions, block_tables, a);     \
  }                                                                                                       \
  extern "C" __global__ void inferd_attention_split_##dt##_d##D(                                          \
      float* partials, const dt* q, const dt* k_cache, const dt* v_cache, const uint32_t* token_seq,      \
      const uint32_t* positions, const uint32_t* block_tables, AttnArgs a, uint32_t seg_len) {            \
    inferd::attention_split<dt, D>(partials, q, k_cache, v_cache, token_seq, positions, block_tables, a,  \
                                   seg_len);                                                              \
  }                                                                                                       \
  extern "C" __global__ void inferd_attention_merge_##dt##_d##D(dt* out, const float* partials,           \
                                                                uint32_t num_heads,                       \
                                                                uint32_t num_segments) {                  \
    inferd::attention_merge<dt, D>(out, partials, num_heads, num_segments);                               \
  }

// Warps per tiled block: 64 query rows for head dim 64, 32 for 128, which
// keeps the block's shared memory near 35 KB (under the 48 KB default).
#define TILED(dt, D, WARPS)                                                                               \
  extern "C" __global__ void __launch_bounds__(WARPS * 32) inferd_attention_tiled_##dt##_d##D(            \
      dt* out, const dt* q, const dt* k_cache, const dt* v_cache, const uint32_t* tile_seq,               \
      const uint32_t* tile_row, const uint32_t* query_start, const uint32_t* context_lens,                \
      const uint32_t* block_tables, AttnArgs a) {                                                         \
    inferd::attention_tiled<dt, D, WARPS>(out, q, k_cache, v_cache, tile_seq, tile_row, query_start,      \
                                          context_lens, block_tables, a);                                 \
  }

CACHE_WRITE(f32)
CACHE_WRITE(f16)
CACHE_WRITE(bf16)
ATTENTION(f32, 64)
ATTENTION(f32, 128)
ATTENTION(f16, 64)
ATTENTION(f16, 128)
ATTENTION(bf16, 64)
ATTENTION(bf16, 128)
TILED(f16, 64, 4)
TILED(f16, 128, 2)
TILED(bf16, 64, 4)
TILED(bf16, 128, 2)

extern "C" __global__ void __launch_bounds__(inferd::SAMPLE_THREADS)
    inferd_sample_rows(const float* logits, uint32_t vocab, const inferd::RowSample* rows, uint32_t* out) {
  inferd::sample_rows(logits, vocab, rows, out);
}

static_assert(sizeof(inferd::RowSample) == 32, "kernels/src/sample.rs assumes this layout");
static_assert(inferd::tiled_smem_bytes<bf16, 64, 4>() == 34816, "kernels/src/plan.rs assumes this size");
static_assert(inferd::tiled_smem_bytes<bf16, 128, 2>() == 35840, "kernels/src/plan.rs assumes this size");
