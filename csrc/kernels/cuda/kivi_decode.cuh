// effx family: KIVI, the CUDA decode path: attention of one query token per row over the
// 2/4-bit codes without dequantizing them (SPECS.md section 2, the fold). Per chunk of tokens:
//   scores: keys are quantized per channel, so q_r[d] * scale[d, g] is folded into the query
//     and q_r . zero[., g] into a bias; a thread takes one code word (16 or 8 tokens of a
//     channel) of a quarter of the channels, the quarters are summed by shuffles;
//   softmax: block-wide per row, in shared memory;
//   values: quantized per token, so p[t] * scale[t, g] multiplies the codes and p[t] *
//     zero[t, g] gathers per channel group; a thread owns 8 channels of every 8th (16th) token.
// The residual and new tokens (at most R + 1) take the plain fp path. Splits merge in the
// engine's combine kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "attention_decode.cuh"
#include "dtype.cuh"
#include "effx/attention.h"
#include "effx/kivi.h"
#include "splits.cuh"

namespace effx {
namespace cuda {
namespace kivi_decode {

constexpr int kThreads = 128;
constexpr int kQuarters = 4;          // channel subsets of the score phase
constexpr int kWordsPerChunk = 32;    // code words per channel per chunk: one per 4 threads
constexpr int kRowGroup = 4;          // query heads scored together (registers: 16 x 4 sums)
template <int BITS> constexpr int kPerWord = 32 / BITS;
template <int BITS> constexpr int kChunk = kWordsPerChunk * kPerWord<BITS>;  // 512 or 256 tokens

inline bool eligible(const AttentionArgs& a, const KiviStorage& s) {
  const int chunk = kWordsPerChunk * 32 / s.bits;
  return a.q_len == 1 && a.scores == nullptr && (a.head_dim == 64 || a.head_dim == 128) && chunk % s.group_size == 0;
}

struct Plan {
  int rows, row_chunks, splits;
  long long tokens_per_split;
};

// slots: blocks the device runs at once; one wave of them (see decode::plan).
inline Plan plan(const AttentionArgs& a, int bits, long long slots) {
  Plan p;
  const long long chunk = kWordsPerChunk * 32 / bits;
  p.rows = decode::rows_for(a);
  p.row_chunks = static_cast<int>(row_chunks(a, p.rows));
  const Splits s = one_wave(split_span(a, a.max_cached + 1), a.batch * a.kv_heads * p.row_chunks, slots, chunk,
                            chunk);
  p.splits = s.count;
  p.tokens_per_split = s.tokens;
  return p;
}

template <int BITS>
__device__ __forceinline__ float code_at(uint32_t word, int j) {
  return static_cast<float>((word >> (BITS * j)) & ((1u << BITS) - 1u));
}

template <typename T, int BITS, int ROWS, int D>
__global__ void __launch_bounds__(kThreads)
    kivi_decode_kernel(AttentionArgs a, KiviStorage st, long long tokens_per_split, float* partial) {
  constexpr int kPer = kPerWord<BITS>, kCh = kChunk<BITS>;
  static_assert(kCh <= kWindowSlack, "a windowed start rounds down to a chunk; the plans allow kWindowSlack");
  constexpr int kTpt = D / 8, kSlots = kThreads / kTpt;  // value phase: threads per token, token slots
  constexpr int kQuarter = D / kQuarters;                 // channels per score thread
  constexpr int kQld = kQuarter + 1;                      // padded: the quarters hit other banks
  __shared__ float q_s[ROWS][kQuarters * kQld];
  __shared__ float m_s[ROWS], l_s[ROWS], alpha_s[ROWS];
  // Scores of the chunk, and after the last chunk the value sums of every token slot.
  constexpr int kScoreFloats = ROWS * kCh, kMergeFloats = kSlots * ROWS * D;
  __shared__ float work[kScoreFloats > kMergeFloats ? kScoreFloats : kMergeFloats];
  float* s_s = work;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const BlockPlace at = block_place(a, ROWS);
  const int split = at.split;
  const long long b = at.b, hk = at.hk, bh = b * st.heads + hk;
  const long long group = a.q_heads / a.kv_heads, row0 = at.row0;
  const long long n = st.state[b * 3], kq = st.state[b * 3 + 1], vq = st.state[b * 3 + 2];
  const long long C = st.capacity, R = st.residual, G = st.group_size;
  const bool live = a.new_lengths == nullptr || a.new_lengths[b] > 0;
  const long long total = live ? n + 1 : 0;
  // Chunks start at multiples of kCh (whole code words); a sliding window masks the tokens of
  // its first chunk before it.
  const long long visible_from = window_first(a, n);
  const long long begin = window_begin(a, n, kCh) + split * tokens_per_split;
  const long long end = begin + tokens_per_split < total ? begin + tokens_per_split : total;

  const T* qp = static_cast<const T*>(a.q.data) + b * a.q.sb;
  for (int idx = tid; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    const bool valid = row0 + r < group;
    q_s[r][d / kQuarter * kQld + d % kQuarter] =
        valid ? to_float(qp[(hk * group + row0 + r) * a.q.sh + d]) * a.sm_scale : 0.0f;
  }
  if (tid < ROWS) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
  }
  auto q_at = [&](int r, int d) { return q_s[r][d / kQuarter * kQld + d % kQuarter]; };

  const int32_t* k_codes = st.k_codes + bh * D * (C * BITS / 32);
  const T* k_scale = static_cast<const T*>(st.k_scale) + bh * D * (C / G);
  const T* k_zero = static_cast<const T*>(st.k_zero) + bh * D * (C / G);
  const T* k_res = static_cast<const T*>(st.k_res) + bh * D * R;
  const int32_t* v_codes = st.v_codes + bh * C * (D * BITS / 32);
  const T* v_scale = static_cast<const T*>(st.v_scale) + bh * C * (D / G);
  const T* v_zero = static_cast<const T*>(st.v_zero) + bh * C * (D / G);
  const T* v_res = static_cast<const T*>(st.v_res) + bh * R * D;
  const T* k_new = static_cast<const T*>(a.k_new.data) + b * a.k_new.sb + hk * a.k_new.sh;
  const T* v_new = static_cast<const T*>(a.v_new.data) + b * a.v_new.sb + hk * a.v_new.sh;

  // Value phase ownership: channels d0..d0+7 of tokens slot, slot + kSlots, ...
  const int slot = tid / kTpt, d0 = tid % kTpt * 8;
  float acc[ROWS][8], zacc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    zacc[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.0f;
  }
  __syncthreads();

  // Score phase ownership: code word w (tokens c0 + w * kPer ...) of channel quarter `quarter`.
  const int quarter = lane % kQuarters, w = warp * (32 / kQuarters) + lane / kQuarters;
  for (long long c0 = begin; c0 < end; c0 += kCh) {
    const long long c1 = c0 + kCh < end ? c0 + kCh : end;
    // Quantized keys: whole words below kq (a multiple of the word's tokens).
    const long long t_word = c0 + static_cast<long long>(w) * kPer;
    const bool quantized = t_word < kq && t_word < c1;
    for (int rg = 0; rg < ROWS; rg += kRowGroup) {
      constexpr int kRg = ROWS < kRowGroup ? ROWS : kRowGroup;
      float part[kRg][kPer], bias[kRg];  // per token q.codes*scale, and the word's q.zero
#pragma unroll
      for (int r = 0; r < kRg; ++r) {
        bias[r] = 0.0f;
#pragma unroll
        for (int j = 0; j < kPer; ++j) part[r][j] = 0.0f;
      }
      if (quantized) {
        const long long word = t_word / kPer, g = t_word / G;
        for (int dd = 0; dd < kQuarter; ++dd) {
          const int d = quarter * kQuarter + dd;
          const uint32_t bits = static_cast<uint32_t>(k_codes[d * (C * BITS / 32) + word]);
          const float scale = to_float(k_scale[d * (C / G) + g]), zero = to_float(k_zero[d * (C / G) + g]);
#pragma unroll
          for (int r = 0; r < kRg; ++r) {
            const float qd = q_at(rg + r, d), qs = qd * scale;
            bias[r] = fmaf(qd, zero, bias[r]);
#pragma unroll
            for (int j = 0; j < kPer; ++j) part[r][j] = fmaf(qs, code_at<BITS>(bits, j), part[r][j]);
          }
        }
      }
      // Every lane takes part in the shuffles, quantized word or not.
#pragma unroll
      for (int r = 0; r < kRg; ++r) {
#pragma unroll
        for (int o = 1; o < kQuarters; o <<= 1) bias[r] += __shfl_xor_sync(0xffffffffu, bias[r], o);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
#pragma unroll
          for (int o = 1; o < kQuarters; o <<= 1) part[r][j] += __shfl_xor_sync(0xffffffffu, part[r][j], o);
        }
      }
      if (quantized && quarter == 0) {
#pragma unroll
        for (int r = 0; r < kRg; ++r)
#pragma unroll
          for (int j = 0; j < kPer; ++j) s_s[(rg + r) * kCh + w * kPer + j] = part[r][j] + bias[r];
      }
    }
    // Residual and new keys: one token per thread, all channels.
    const long long first = c0 > kq ? c0 : kq;
    for (long long t = first + tid; t < c1; t += kThreads) {
      float x[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) x[r] = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float kd = t < n ? to_float(k_res[d * R + t % R]) : to_float(k_new[d]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) x[r] = fmaf(q_at(r, d), kd, x[r]);
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s_s[r * kCh + (t - c0)] = x[r];
    }
    __syncthreads();

    // Softmax over the chunk, one warp per row.
    for (int r = warp; r < ROWS; r += kThreads / 32) {
      float mx = -INFINITY;
      for (int j = lane; j < kCh; j += 32) {
        if (c0 + j >= c1 || c0 + j < visible_from) s_s[r * kCh + j] = -INFINITY;
        mx = fmaxf(mx, s_s[r * kCh + j]);
      }
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = m_s[r], m_new = fmaxf(m_old, mx);
      float sum = 0.0f;
      for (int j = lane; j < kCh; j += 32) {
        const float p = m_new == -INFINITY ? 0.0f : __expf(s_s[r * kCh + j] - m_new);
        s_s[r * kCh + j] = p;
        sum += p;
      }
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) {
        const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_old - m_new);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();

    // Values: p[t] * scale[t, g] times the codes, p[t] * zero[t, g] per channel group.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float alpha = alpha_s[r];
      zacc[r] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
    }
    for (long long t = c0 + slot; t < c1; t += kSlots) {
      float p[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) p[r] = s_s[r * kCh + (t - c0)];
      if (t < vq) {
        const uint32_t word = static_cast<uint32_t>(v_codes[t * (D * BITS / 32) + d0 * BITS / 32]);
        const int shift = d0 * BITS % 32;
        const long long g = t * (D / G) + d0 / G;
        const float scale = to_float(v_scale[g]), zero = to_float(v_zero[g]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float pv = p[r] * scale;
          zacc[r] = fmaf(p[r], zero, zacc[r]);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(pv, code_at<BITS>(word >> shift, e), acc[r][e]);
        }
      } else {
        const T* src = t < n ? v_res + (t % R) * D + d0 : v_new + d0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float x = to_float(src[e]);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) acc[r][e] = fmaf(p[r], x, acc[r][e]);
        }
      }
    }
    __syncthreads();  // s_s is rewritten by the next chunk
  }

  // Sum the token slots' value sums (the softmax state is already the block's).
  float* acc_s = work;  // [kSlots][ROWS][D]
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc_s[(slot * ROWS + r) * D + d0 + e] = acc[r][e] + zacc[r];
  __syncthreads();
  for (int idx = tid; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    if (row0 + r >= group) continue;
    float o = 0.0f;
    for (int s = 0; s < kSlots; ++s) o += acc_s[(s * ROWS + r) * D + d];
    write_result<T>(a, partial, split, b * a.q_heads + hk * group + row0 + r, d, o, m_s[r], l_s[r], true);  // q_len 1
  }
}

}  // namespace kivi_decode
}  // namespace cuda
}  // namespace effx
