// Writes this step's K and V rows into the paged cache through the slot
// mapping. Cache layout per layer: [num_blocks, block_size, kv_heads, head_dim],
// so a slot's row is kv_heads * head_dim contiguous elements.
#pragma once

#include "common.cuh"

namespace inferd {

// grid: (num_tokens), block: up to 256 threads striding over the row.
template <typename T>
__device__ void cache_write(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                            T* __restrict__ v_cache, const uint32_t* __restrict__ slot_mapping,
                            uint32_t row, uint32_t k_stride, uint32_t v_stride) {
  const uint32_t t = blockIdx.x;
  const uint64_t dst = (uint64_t)slot_mapping[t] * row;
  const T* ks = k + (uint64_t)t * k_stride;
  const T* vs = v + (uint64_t)t * v_stride;
  for (uint32_t i = threadIdx.x; i < row; i += blockDim.x) {
    k_cache[dst + i] = ks[i];
    v_cache[dst + i] = vs[i];
  }
}

}  // namespace inferd
