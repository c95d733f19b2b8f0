// Sampling on the GPU, one block per sampled row of f32 logits, with the
// host sampler's semantics (crates/inferd-exec/src/sampler.rs) so a step
// whose rows need nothing else copies token ids instead of logits:
//   - top_k == 0 (then top_p is 1): temperature sampling over the whole
//     vocabulary by Gumbel-max, argmax(l / T + Gumbel noise), which draws
//     exactly from softmax(l / T);
//   - top_k in 1..=MAX_TOP_K: the k largest logits (found by a radix select
//     on order-preserving keys; ties broken by the lower id), their
//     probabilities under softmax(l / T) of the whole vocabulary, cut to the
//     nucleus whose mass reaches top_p of the whole, and one draw among them.
//     Greedy is top_k 1.
// The uniform draws are a hash of (seed, counter, index): the host sends the
// request's seed (or a fresh random one) and its token count, so a seeded
// request redraws the same tokens after a preemption.
#pragma once

#include "common.cuh"

namespace inferd {

constexpr int SAMPLE_THREADS = 1024;
constexpr int MAX_TOP_K = 1024;

// One row's parameters; 32 bytes, laid out as inferd_kernels::RowSample.
struct RowSample {
  float temperature;
  float top_p;
  uint32_t top_k;
  uint32_t pad;
  unsigned long long seed;
  unsigned long long counter;
};

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A uniform draw in (0, 1) keyed by (seed, counter, index).
__device__ __forceinline__ float uniform01(unsigned long long seed, unsigned long long counter,
                                           unsigned long long index) {
  const unsigned long long h = splitmix64(seed ^ splitmix64(counter ^ splitmix64(index)));
  return ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// Float bits mapped so that unsigned order is float order.
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

struct Best {
  float v;
  uint32_t i;
};

// The larger value; on a tie the lower index.
__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ __forceinline__ Best block_best(Best mine, Best* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Best o{__shfl_xor_sync(0xffffffffu, mine.v, off), __shfl_xor_sync(0xffffffffu, mine.i, off)};
    mine = better(mine, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = mine;
  __syncthreads();
  if (warp == 0) {
    mine = lane < (int)(blockDim.x / 32) ? scratch[lane] : Best{-INFINITY, 0xffffffffu};
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      Best o{__shfl_xor_sync(0xffffffffu, mine.v, off), __shfl_xor_sync(0xffffffffu, mine.i, off)};
      mine = better(mine, o);
    }
    if (lane == 0) scratch[0] = mine;
  }
  __syncthreads();
  const Best out = scratch[0];
  __syncthreads();
  return out;
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
  x = warp_sum(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < (int)(blockDim.x / 32) ? scratch[lane] : 0.f;
    x = warp_sum(x);
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  const float out = scratch[0];
  __syncthreads();
  return out;
}

// grid: (rows); block: SAMPLE_THREADS. out[r] is row r's token.
__device__ void sample_rows(const float* __restrict__ logits, uint32_t vocab, const RowSample* __restrict__ rows,
                            uint32_t* __restrict__ out) {
  __shared__ Best best_scratch[32];
  __shared__ float sum_scratch[32];
  __shared__ uint32_t hist[256];
  __shared__ uint32_t chosen, needed, count;
  __shared__ float cand_v[MAX_TOP_K];
  __shared__ uint32_t cand_i[MAX_TOP_K];
  const uint32_t r = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const float* l = logits + (uint64_t)r * vocab;
  const RowSample p = rows[r];
  const float inv_t = 1.f / p.temperature;

  if (p.top_k == 0) {
    Best mine{-INFINITY, 0xffffffffu};
    for (uint32_t i = tid; i < vocab; i += nt) {
      const float g = l[i] * inv_t - logf(-logf(uniform01(p.seed, p.counter, i)));
      mine = better(mine, Best{g, i});
    }
    const Best b = block_best(mine, best_scratch);
    if (tid == 0) out[r] = b.i;
    return;
  }

  // The largest logit and the whole distribution's mass under T.
  Best mine{-INFINITY, 0xffffffffu};
  for (uint32_t i = tid; i < vocab; i += nt) mine = better(mine, Best{l[i], i});
  const float m = block_best(mine, best_scratch).v;
  float part = 0.f;
  for (uint32_t i = tid; i < vocab; i += nt) part += expf((l[i] - m) * inv_t);
  const float total = block_sum(part, sum_scratch);

  // Radix select: the key of the k-th largest logit, 8 bits at a time.
  const uint32_t k = min(p.top_k, (uint32_t)MAX_TOP_K);
  uint32_t prefix = 0, mask = 0;
  if (tid == 0) needed = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (uint32_t b = tid; b < 256; b += nt) hist[b] = 0;
    __syncthreads();
    for (uint32_t i = tid; i < vocab; i += nt) {
      const uint32_t key = order_key(l[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t above = 0;
      for (int b = 255; b >= 0; --b) {
        if (above + hist[b] >= needed) {
          chosen = (uint32_t)b;
          needed -= above;
          break;
        }
        above += hist[b];
      }
    }
    __syncthreads();
    prefix |= chosen << shift;
    mask |= 255u << shift;
    __syncthreads();
  }
  // Candidates: every key above the threshold, and the ties at it.
  if (tid == 0) count = 0;
  __syncthreads();
  for (uint32_t i = tid; i < vocab; i += nt) {
    if (order_key(l[i]) >= prefix) {
      const uint32_t at = atomicAdd(&count, 1u);
      if (at < (uint32_t)MAX_TOP_K) {
        cand_v[at] = l[i];
        cand_i[at] = i;
      }
    }
  }
  __syncthreads();
  const uint32_t n = min(count, (uint32_t)MAX_TOP_K);
  for (uint32_t j = n + tid; j < (uint32_t)MAX_TOP_K; j += nt) {
    cand_v[j] = -INFINITY;
    cand_i[j] = 0xffffffffu;
  }
  __syncthreads();
  // Bitonic sort, largest value first, lower id first on ties.
  for (uint32_t size = 2; size <= (uint32_t)MAX_TOP_K; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t j = tid; j < (uint32_t)MAX_TOP_K; j += nt) {
        const uint32_t o = j ^ stride;
        if (o > j) {
          const bool first_before = cand_v[j] > cand_v[o] || (cand_v[j] == cand_v[o] && cand_i[j] < cand_i[o]);
          const bool descending = (j & size) == 0;
          if (first_before != descending) {
            const float tv = cand_v[j];
            cand_v[j] = cand_v[o];
            cand_v[o] = tv;
            const uint32_t ti = cand_i[j];
            cand_i[j] = cand_i[o];
            cand_i[o] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
  if (tid == 0) {
    // The nucleus within the top k, then one draw in it.
    const uint32_t kept = min(k, n);
    float cum = 0.f;
    uint32_t last = 0;
    for (uint32_t j = 0; j < kept; ++j) {
      cum += expf((cand_v[j] - m) * inv_t);
      last = j;
      if (cum >= p.top_p * total) break;
    }
    float x = uniform01(p.seed, p.counter, 0xffffffffffffffffull) * cum;
    uint32_t pick = cand_i[last];
    for (uint32_t j = 0; j <= last; ++j) {
      x -= expf((cand_v[j] - m) * inv_t);
      if (x < 0.f) {
        pick = cand_i[j];
        break;
      }
    }
    out[r] = pick;
  }
}

}  // namespace inferd
