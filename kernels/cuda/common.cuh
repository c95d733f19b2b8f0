// Shared helpers of inferd's CUDA kernels: element conversions for the three
// cache/activation dtypes, warp reductions and the block-table lookup.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace inferd {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The KV slot of position `pos` of a sequence whose block table is `table`.
__device__ __forceinline__ uint64_t slot_of(const uint32_t* table, uint32_t pos, uint32_t block_size) {
  return (uint64_t)table[pos / block_size] * block_size + pos % block_size;
}

// Online softmax state of one query row: running max, running sum.
struct SoftmaxState {
  float max;
  float sum;
};

}  // namespace inferd
