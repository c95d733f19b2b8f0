// Paged attention on tensor cores (f16/bf16, sm_80+). A block serves one
// tile of query rows of one sequence and one KV head: rows are (query token,
// head within the GQA group) pairs, r = token * group + g, 16 per warp, so a
// key/value tile loaded once into shared memory serves every query head of
// the group and every token of the tile. Per key tile of 16 positions:
// S = Q K^T (WMMA, f32 accumulate), a causal mask (a row's token sees
// positions up to its own), an online softmax per row, O += P V (WMMA). O
// lives in shared memory in f32 so that its rows can be rescaled, which WMMA
// accumulator fragments do not allow.
#pragma once

#include <mma.h>

#include "common.cuh"

namespace inferd {

constexpr int KEY_TILE = 16;

// Shared memory a tiled block needs, in bytes (also computed on the host:
// kernels/src/plan.rs keeps the same formula).
template <typename T, int D, int WARPS>
constexpr unsigned tiled_smem_bytes() {
  constexpr unsigned m = 16 * WARPS;
  return m * D * sizeof(T)                      // Q tile
         + 2 * KEY_TILE * D * sizeof(T)         // K and V tiles
         + WARPS * 256 * sizeof(float)          // scores per warp
         + WARPS * 256 * sizeof(T)              // probabilities per warp
         + m * D * sizeof(float);               // O accumulators
}

// grid: (num_tiles, num_kv_heads); block: WARPS * 32 threads; dynamic shared
// memory: tiled_smem_bytes. tile_seq[b] and tile_row[b] name the sequence and
// first row of tile b.
template <typename T, int D, int WARPS>
__device__ void attention_tiled(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                                const T* __restrict__ v_cache, const uint32_t* __restrict__ tile_seq,
                                const uint32_t* __restrict__ tile_row, const uint32_t* __restrict__ query_start,
                                const uint32_t* __restrict__ context_lens,
                                const uint32_t* __restrict__ block_tables, AttnArgs a) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int M = 16 * WARPS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + M * D;
  T* vs = ks + KEY_TILE * D;
  float* ss = reinterpret_cast<float*>(vs + KEY_TILE * D);
  T* ps = reinterpret_cast<T*>(ss + WARPS * 256);
  float* os = reinterpret_cast<float*>(ps + WARPS * 256);

  const uint32_t b = blockIdx.x, kvh = blockIdx.y;
  const uint32_t s = tile_seq[b], row0 = tile_row[b];
  const uint32_t group = a.num_heads / a.num_kv_heads;
  const uint32_t q0 = query_start[s], q_len = query_start[s + 1] - q0;
  const uint32_t rows = q_len * group;
  const uint32_t ctx = context_lens[s];
  const uint32_t first_pos = ctx - q_len;
  const uint32_t* table = block_tables + (uint64_t)s * a.max_blocks;
  const uint64_t kv_row = (uint64_t)a.num_kv_heads * D;
  const uint32_t tid = threadIdx.x, nthreads = blockDim.x;
  const uint32_t warp = tid / 32, lane = tid % 32;

  // The Q tile (rows past the sequence's are zeros) and O = 0.
  for (uint32_t i = tid; i < M * D; i += nthreads) {
    const uint32_t r = row0 + i / D, d = i % D;
    T x = from_float<T>(0.f);
    if (r < rows) {
      const uint32_t h = kvh * group + r % group;
      x = q[(uint64_t)(q0 + r / group) * a.q_stride + (uint64_t)h * D + d];
    }
    qs[i] = x;
    os[i] = 0.f;
  }
  // Each lane owns half of one row of its warp: row rr, columns c0..c0 + 8.
  const uint32_t rr = lane / 2, half = lane % 2, c0 = half * 8;
  const uint32_t my_row = row0 + warp * 16 + rr;
  const uint32_t my_pos = first_pos + (my_row < rows ? my_row / group : 0);
  const uint32_t last_row = min(row0 + M, rows) - 1;
  const uint32_t max_pos = first_pos + last_row / group;
  SoftmaxState st{-INFINITY, 0.f};
  float* sw = ss + warp * 256;
  T* pw = ps + warp * 256;
  float* ow = os + warp * 16 * D;

  for (uint32_t j0 = 0; j0 <= max_pos; j0 += KEY_TILE) {
    __syncthreads();  // Q is loaded, or the previous K/V tile is used up
    for (uint32_t i = tid; i < KEY_TILE * D; i += nthreads) {
      const uint32_t pos = j0 + i / D, d = i % D;
      T kx = from_float<T>(0.f), vx = from_float<T>(0.f);
      if (pos < ctx) {
        const uint64_t at = slot_of(table, pos, a.block_size) * kv_row + (uint64_t)kvh * D + d;
        kx = k_cache[at];
        vx = v_cache[at];
      }
      ks[i] = kx;
      vs[i] = vx;
    }
    __syncthreads();

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
    wmma::fill_fragment(sf, 0.f);
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;
      wmma::load_matrix_sync(qa, qs + warp * 16 * D + d0, D);
      wmma::load_matrix_sync(kb, ks + d0, D);
      wmma::mma_sync(sf, qa, kb, sf);
    }
    wmma::store_matrix_sync(sw, sf, 16, wmma::mem_row_major);
    __syncwarp();

    float sv[8];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint32_t pos = j0 + c0 + c;
      sv[c] = pos <= my_pos ? sw[rr * 16 + c0 + c] * a.scale : -INFINITY;
      tile_max = fmaxf(tile_max, sv[c]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    // Position 0 is in every row's first tile, so max is finite from then on.
    const float m_new = fmaxf(st.max, tile_max);
    const float corr = expf(st.max - m_new);
    float psum = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float e = expf(sv[c] - m_new);
      psum += e;
      pw[rr * 16 + c0 + c] = from_float<T>(e);
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    st.sum = st.sum * corr + psum;
    st.max = m_new;
    float* orow = ow + rr * D + half * (D / 2);
#pragma unroll
    for (int i = 0; i < D / 2; ++i) orow[i] *= corr;
    __syncwarp();

    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
    wmma::load_matrix_sync(pa, pw, 16);
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
      wmma::load_matrix_sync(of, ow + d0, D, wmma::mem_row_major);
      wmma::load_matrix_sync(vb, vs + d0, D);
      wmma::mma_sync(of, pa, vb, of);
      wmma::store_matrix_sync(ow + d0, of, D, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (my_row < rows) {
    const uint32_t h = kvh * group + my_row % group;
    T* dst = out + (uint64_t)(q0 + my_row / group) * a.num_heads * D + (uint64_t)h * D + half * (D / 2);
    const float* orow = ow + rr * D + half * (D / 2);
    const float inv = 1.f / st.sum;
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dst[i] = from_float<T>(orow[i] * inv);
  }
#endif
}

}  // namespace inferd
