// Paged attention, the simple and general kernel: one warp per (query token,
// query head), an online softmax over the key positions in f32. Every query
// token attends to its own sequence's positions 0..=its own through the
// sequence's block table, so prefill, chunked prefill, prefix-cache hits and
// decode in one mixed batch are the same rule. The split-K variant runs the
// same loop over one segment of the positions and leaves a partial result
// that a second kernel merges.
#pragma once

#include "common.cuh"

namespace inferd {

// What one warp needs to find one query head's keys.
struct AttnArgs {
  uint32_t q_stride;      // elements between consecutive tokens of q
  uint32_t num_heads;
  uint32_t num_kv_heads;
  uint32_t block_size;
  uint32_t max_blocks;    // width of a block-table row
  float scale;
};

// Accumulates the keys at positions [begin, end) into (state, acc). Each lane
// holds D / 32 consecutive elements of the query, the accumulator and the
// rows it reads.
template <typename T, int D>
__device__ __forceinline__ void attend_range(const float (&q)[D / 32], const T* __restrict__ k_cache,
                                             const T* __restrict__ v_cache, const uint32_t* __restrict__ table,
                                             const AttnArgs& a, uint32_t kvh, uint32_t begin, uint32_t end,
                                             uint32_t lane, SoftmaxState& st, float (&acc)[D / 32]) {
  constexpr int EPL = D / 32;
  const uint64_t row = (uint64_t)a.num_kv_heads * D;
  for (uint32_t p = begin; p < end; ++p) {
    const uint64_t base = slot_of(table, p, a.block_size) * row + (uint64_t)kvh * D + lane * EPL;
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < EPL; ++i) dot += q[i] * to_float(k_cache[base + i]);
    const float s = warp_sum(dot);
    const float m_new = fmaxf(st.max, s);
    const float corr = expf(st.max - m_new);
    const float w = expf(s - m_new);
    st.sum = st.sum * corr + w;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[i] = acc[i] * corr + w * to_float(v_cache[base + i]);
    st.max = m_new;
  }
}

// Loads this lane's part of query head `h` of token `t`, pre-scaled.
template <typename T, int D>
__device__ __forceinline__ void load_query(const T* __restrict__ q, const AttnArgs& a, uint32_t t, uint32_t h,
                                           uint32_t lane, float (&out)[D / 32]) {
  constexpr int EPL = D / 32;
  const T* src = q + (uint64_t)t * a.q_stride + (uint64_t)h * D + lane * EPL;
#pragma unroll
  for (int i = 0; i < EPL; ++i) out[i] = to_float(src[i]) * a.scale;
}

// One warp's query head of token t (blockIdx.x) over positions [begin, end)
// of its sequence: leaves (st, acc) and returns the head.
template <typename T, int D>
__device__ __forceinline__ uint32_t attend_warp(const T* __restrict__ q, const T* __restrict__ k_cache,
                                                const T* __restrict__ v_cache, const uint32_t* __restrict__ token_seq,
                                                const uint32_t* __restrict__ block_tables, const AttnArgs& a,
                                                uint32_t begin, uint32_t end, SoftmaxState& st,
                                                float (&acc)[D / 32]) {
  const uint32_t t = blockIdx.x, kvh = blockIdx.y;
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t h = kvh * (a.num_heads / a.num_kv_heads) + warp;
  float qv[D / 32];
  load_query<T, D>(q, a, t, h, lane, qv);
#pragma unroll
  for (int i = 0; i < D / 32; ++i) acc[i] = 0.f;
  st = SoftmaxState{-INFINITY, 0.f};
  const uint32_t* table = block_tables + (uint64_t)token_seq[t] * a.max_blocks;
  attend_range<T, D>(qv, k_cache, v_cache, table, a, kvh, begin, end, lane, st, acc);
  return h;
}

// grid: (num_tokens, num_kv_heads); block: group * 32 threads, warp w serves
// query head kvh * group + w. out is (num_tokens, num_heads * D).
template <typename T, int D>
__device__ void attention_simple(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                                 const T* __restrict__ v_cache, const uint32_t* __restrict__ token_seq,
                                 const uint32_t* __restrict__ positions, const uint32_t* __restrict__ block_tables,
                                 AttnArgs a) {
  constexpr int EPL = D / 32;
  const uint32_t t = blockIdx.x, lane = threadIdx.x % 32;
  SoftmaxState st;
  float acc[EPL];
  const uint32_t h = attend_warp<T, D>(q, k_cache, v_cache, token_seq, block_tables, a, 0, positions[t] + 1, st, acc);
  T* dst = out + (uint64_t)t * a.num_heads * D + (uint64_t)h * D + lane * EPL;
  const float inv = 1.f / st.sum;
#pragma unroll
  for (int i = 0; i < EPL; ++i) dst[i] = from_float<T>(acc[i] * inv);
}

// Split-K: grid (num_tokens, num_kv_heads, num_segments), segment z covers
// positions [z * seg_len, (z + 1) * seg_len) of each token's context. The
// partial of (token, head, segment) is [max, sum, acc[D]] in f32, at
// partials + ((t * num_heads + h) * num_segments + z) * (D + 2).
template <typename T, int D>
__device__ void attention_split(float* __restrict__ partials, const T* __restrict__ q,
                                const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                const uint32_t* __restrict__ token_seq, const uint32_t* __restrict__ positions,
                                const uint32_t* __restrict__ block_tables, AttnArgs a, uint32_t seg_len) {
  constexpr int EPL = D / 32;
  const uint32_t t = blockIdx.x, z = blockIdx.z, lane = threadIdx.x % 32;
  const uint32_t ctx = positions[t] + 1;
  const uint32_t begin = min(z * seg_len, ctx), end = min(begin + seg_len, ctx);
  SoftmaxState st;
  float acc[EPL];
  const uint32_t h = attend_warp<T, D>(q, k_cache, v_cache, token_seq, block_tables, a, begin, end, st, acc);
  float* dst = partials + (((uint64_t)t * a.num_heads + h) * gridDim.z + z) * (D + 2);
  if (lane == 0) {
    dst[0] = st.max;
    dst[1] = st.sum;
  }
#pragma unroll
  for (int i = 0; i < EPL; ++i) dst[2 + lane * EPL + i] = acc[i];
}

// Merges the split-K partials: grid (num_tokens, num_heads), block 32.
// Empty segments (sum 0) contribute nothing.
template <typename T, int D>
__device__ void attention_merge(T* __restrict__ out, const float* __restrict__ partials, uint32_t num_heads,
                                uint32_t num_segments) {
  constexpr int EPL = D / 32;
  const uint32_t t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
  const float* src = partials + ((uint64_t)t * num_heads + h) * num_segments * (D + 2);
  float m = -INFINITY;
  for (uint32_t z = 0; z < num_segments; ++z)
    if (src[z * (D + 2) + 1] > 0.f) m = fmaxf(m, src[z * (D + 2)]);
  float sum = 0.f, acc[EPL];
#pragma unroll
  for (int i = 0; i < EPL; ++i) acc[i] = 0.f;
  for (uint32_t z = 0; z < num_segments; ++z) {
    const float* p = src + z * (D + 2);
    if (p[1] <= 0.f) continue;
    const float w = expf(p[0] - m);
    sum += p[1] * w;
#pragma unroll
    for (int i = 0; i < EPL; ++i) acc[i] += p[2 + lane * EPL + i] * w;
  }
  T* dst = out + (uint64_t)t * num_heads * D + (uint64_t)h * D + lane * EPL;
  const float inv = 1.f / sum;
#pragma unroll
  for (int i = 0; i < EPL; ++i) dst[i] = from_float<T>(acc[i] * inv);
}

}  // namespace inferd
