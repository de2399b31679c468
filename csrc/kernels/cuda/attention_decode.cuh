// effx: the CUDA decode path of the cache attention (one query token per row, the case that
// is bound by reading the cache). A block owns (token split, batch row, kv-head, up to ROWS
// query heads of the GQA group): the group's queries sit in registers, and each 16-byte
// vector of a key or value row is loaded once from global memory straight into the registers
// of one thread, which serves every query head of the group with it. TPT threads cover one
// token (head_dim = 8 * TPT); the block's 128 / TPT token slots walk their tokens with an
// online softmax each, then merge in shared memory; splits merge in the engine's combine
// kernel. No shared-memory staging: the engine's fp32 tiles cost two shared loads per FMA,
// which caps it well below the memory roof at this arithmetic intensity.
// H2O scoring rides along: the kernel writes each (query head, token) score to a workspace
// row and a last kernel, once the LSE is known, adds exp(score - lse) over the group to the
// token's accumulated score. That is 4 bytes per head and token written and read again, where
// the separate scoring pass of h2o.cu re-reads every key.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "dtype.cuh"
#include "effx/attention.h"
#include "splits.cuh"

namespace effx {
namespace cuda {
namespace decode {

constexpr int kThreads = 128;
constexpr int kVec = 8;      // elements per thread and token: 16 bytes of fp16/bf16
// Tokens per slot in flight per iteration: fewer for 8 rows, whose queries and accumulators
// already hold 128 registers.
template <int ROWS> constexpr int kUnroll = ROWS >= 8 ? 2 : 4;
constexpr int kMinTokensPerSplit = 256;

// Eight consecutive elements of a row, loaded as one 16-byte vector (two for fp32) and kept
// packed until used: half the registers of fp32 copies, so more blocks fit per multiprocessor.
template <typename T>
struct Vec8 {
  uint4 raw;
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void zero() { raw = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ float operator[](int e) const { return to_float(reinterpret_cast<const T*>(&raw)[e]); }
};
template <>
struct Vec8<float> {
  float4 lo, hi;
  __device__ __forceinline__ void load(const float* p) {
    lo = reinterpret_cast<const float4*>(p)[0];
    hi = reinterpret_cast<const float4*>(p)[1];
  }
  __device__ __forceinline__ void zero() { lo = hi = make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
  __device__ __forceinline__ float operator[](int e) const {
    const float4& h = e < 4 ? lo : hi;
    switch (e % 4) {
      case 0: return h.x;
      case 1: return h.y;
      case 2: return h.z;
      default: return h.w;
    }
  }
};

// Do the step's new key and value rows all start 16-byte aligned?
inline bool new_rows_aligned(const AttentionArgs& a, int elem_bytes) {
  for (const Strided& x : {a.k_new, a.v_new}) {
    if (reinterpret_cast<uintptr_t>(x.data) % 16 != 0 || x.sb * elem_bytes % 16 != 0 ||
        x.sh * elem_bytes % 16 != 0 || x.st * elem_bytes % 16 != 0) {
      return false;
    }
  }
  return true;
}

// And the cached rows at k, v (batch, head and token strides shared by keys and values)?
inline bool rows_aligned(const AttentionArgs& a, int elem_bytes, const void* k, const void* v,
                         const int64_t (&strides)[3]) {
  for (const void* p : {k, v}) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  for (const int64_t x : strides) {
    if (x * elem_bytes % 16 != 0) return false;
  }
  return new_rows_aligned(a, elem_bytes);
}

// Does the decode path take this call? (Scoring needs the LSE.)
inline bool eligible(const AttentionArgs& a, bool aligned) {
  const long long D = a.head_dim;
  return aligned && a.q_len == 1 && (a.scores == nullptr || a.lse != nullptr) && (D == 64 || D == 128 || D == 256);
}

struct Plan {
  int rows;  // query heads per block (1, 2, 4 or 8)
  int row_chunks;
  int splits;
  long long tokens_per_split;
  long long raw_stride;  // floats per query head in the raw-score workspace (scoring only)
};

// Workspace: the splits' partials, then (scoring) the raw scores [B, Hq, raw_stride].
inline size_t raw_scores_bytes(const AttentionArgs& a) {
  return a.scores ? sizeof(float) * a.batch * a.q_heads * (a.max_cached + 1) : 0;
}

inline int rows_for(const AttentionArgs& a) {
  const long long group = a.q_heads / a.kv_heads;
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
}

// slots: blocks the device runs at once (multiprocessors times resident blocks each). One
// wave of them, never a split shorter than kMinTokensPerSplit.
inline Plan plan(const AttentionArgs& a, long long slots) {
  Plan p;
  p.rows = rows_for(a);
  p.row_chunks = static_cast<int>(row_chunks(a, p.rows));
  const Splits s = one_wave(split_span(a, a.max_cached + 1), a.batch * a.kv_heads * p.row_chunks, slots,
                            kMinTokensPerSplit, 32);
  p.splits = s.count;
  p.tokens_per_split = s.tokens;
  p.raw_stride = a.max_cached + 1;
  return p;
}

// Rows: a policy with
//   __device__ const T* key(b, h, t) const, value(b, h, t): pointer to cached row t.
template <typename T, int ROWS, int TPT, typename Rows>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(AttentionArgs a, Rows cached, long long tokens_per_split, float* partial, float* raw,
                  long long raw_stride) {
  constexpr int kSlots = kThreads / TPT;
  __shared__ float m_s[kSlots][ROWS], l_s[kSlots][ROWS];
  __shared__ float acc_s[kSlots][ROWS][TPT * kVec];
  constexpr int D = TPT * kVec;
  const int tid = threadIdx.x, slot = tid / TPT, d0 = (tid % TPT) * kVec;
  const BlockPlace at = block_place(a, ROWS);
  const int split = at.split;
  const long long b = at.b, hk = at.hk;
  const long long group = a.q_heads / a.kv_heads, row0 = at.row0;
  const long long n = a.lengths[b * a.lengths_stride];
  const bool live = a.new_lengths == nullptr || a.new_lengths[b] > 0;  // else the row is padding
  const long long total = live ? n + 1 : 0;
  const long long begin = window_begin(a, n, 1) + split * tokens_per_split;
  const long long end = begin + tokens_per_split < total ? begin + tokens_per_split : total;

  float q[ROWS][kVec], acc[ROWS][kVec], m[ROWS], l[ROWS];
  const T* qp = static_cast<const T*>(a.q.data) + b * a.q.sb;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const bool valid = row0 + r < group;
    const T* qr = qp + (hk * group + row0 + r) * a.q.sh + d0;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      q[r][e] = valid ? to_float(qr[e]) * a.sm_scale : 0.0f;
      acc[r][e] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  const T* k_new = static_cast<const T*>(a.k_new.data) + b * a.k_new.sb + hk * a.k_new.sh;
  const T* v_new = static_cast<const T*>(a.v_new.data) + b * a.v_new.sb + hk * a.v_new.sh;

  // The trip count is the block's, not the slot's: every lane reaches every shuffle.
  for (long long base = begin; base < end; base += kSlots * kUnroll<ROWS>) {
    Vec8<T> k[kUnroll<ROWS>], v[kUnroll<ROWS>];
    bool valid[kUnroll<ROWS>];
#pragma unroll
    for (int u = 0; u < kUnroll<ROWS>; ++u) {
      const long long t = base + u * kSlots + slot;
      valid[u] = t < end;
      if (valid[u]) {
        k[u].load((t < n ? cached.key(b, hk, t) : k_new) + d0);
        v[u].load((t < n ? cached.value(b, hk, t) : v_new) + d0);
      } else {
        k[u].zero();
        v[u].zero();
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float s[kUnroll<ROWS>];
#pragma unroll
      for (int u = 0; u < kUnroll<ROWS>; ++u) {
        float x = 0.0f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) x = fmaf(q[r][e], k[u][e], x);
#pragma unroll
        for (int o = TPT / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        s[u] = valid[u] ? x : -INFINITY;
        if (raw && valid[u] && d0 == 0 && row0 + r < group) {
          raw[(b * a.q_heads + hk * group + row0 + r) * raw_stride + base + u * kSlots + slot] = x;
        }
      }
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < kUnroll<ROWS>; ++u) mx = fmaxf(mx, s[u]);
      if (mx == -INFINITY) continue;  // nothing seen yet by this slot
      const float alpha = __expf(m[r] - mx);  // 0 when m[r] is -inf
      float sum = 0.0f, p[kUnroll<ROWS>];
#pragma unroll
      for (int u = 0; u < kUnroll<ROWS>; ++u) sum += (p[u] = __expf(s[u] - mx));
      l[r] = l[r] * alpha + sum;
      m[r] = mx;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float x = acc[r][e] * alpha;
#pragma unroll
        for (int u = 0; u < kUnroll<ROWS>; ++u) x = fmaf(p[u], v[u][e], x);
        acc[r][e] = x;
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (d0 == 0) {
      m_s[slot][r] = m[r];
      l_s[slot][r] = l[r];
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc_s[slot][r][d0 + e] = acc[r][e];
  }
  __syncthreads();
  for (int idx = tid; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    if (row0 + r >= group) continue;
    float mx = -INFINITY;
    for (int s = 0; s < kSlots; ++s) mx = fmaxf(mx, m_s[s][r]);
    float sum = 0.0f, o = 0.0f;
    if (mx != -INFINITY) {
      for (int s = 0; s < kSlots; ++s) {
        const float w = __expf(m_s[s][r] - mx);
        sum += l_s[s][r] * w;
        o += acc_s[s][r][d] * w;
      }
    }
    write_result<T>(a, partial, split, b * a.q_heads + hk * group + row0 + r, d, o, mx, sum, true);  // q_len is 1
  }
}

// scores[b, h, t] gains (cached t) or is set to (the new token) the sum over the group of
// exp(raw - lse): the token's attention probability from each query head.
// (A template so that every CUDA source may include this header.)
template <int THREADS>
__global__ void __launch_bounds__(THREADS) scores_kernel(AttentionArgs a, const float* raw, long long raw_stride) {
  const long long t = blockIdx.y * static_cast<long long>(THREADS) + threadIdx.x;
  const long long b = blockIdx.x / a.kv_heads, hk = blockIdx.x % a.kv_heads;
  const long long n = a.lengths[b * a.lengths_stride], group = a.q_heads / a.kv_heads;
  const bool live = a.new_lengths == nullptr || a.new_lengths[b] > 0;
  if (!live || t > n) return;
  float sum = 0.0f;
  for (long long r = 0; r < group; ++r) {
    const long long row = b * a.q_heads + hk * group + r;
    sum += __expf(raw[row * raw_stride + t] - a.lse[row]);
  }
  float* sc = a.scores + b * a.scores_sb + hk * a.scores_sh;
  sc[t] = t < n ? sc[t] + sum : sum;
}

}  // namespace decode
}  // namespace cuda
}  // namespace effx
