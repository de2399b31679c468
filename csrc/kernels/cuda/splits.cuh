// effx: how the CUDA attention paths cut a token range across blocks (flash-decoding), and
// what each block writes: the result itself, or its split's partial for combine_kernel.
#pragma once

#include <cmath>

#include "dtype.cuh"
#include "effx/attention.h"

namespace effx {
namespace cuda {

struct Splits {
  int count;
  long long tokens;  // per split, a multiple of `align`
};

// `total` tokens for each of `units` (batch row, kv-head, row chunk) blocks: as many splits as
// fill one wave of `slots` resident blocks, none shorter than `min_tokens`.
inline Splits one_wave(long long total, long long units, long long slots, long long min_tokens, long long align) {
  long long count = slots / units;
  const long long most = (total + min_tokens - 1) / min_tokens;
  count = count < most ? count : most;
  count = count < 1 ? 1 : count;
  const long long per = (total + count - 1) / count;
  return Splits{static_cast<int>(count), (per + align - 1) / align * align};
}

// The widest alignment of a windowed start (window_begin) on any path: KIVI's 2-bit decode
// chunk. Every path plans with this same slack, so the KIVI decode splits stay no more than
// the dense decode path's, which the shared workspace is sized for.
constexpr long long kWindowSlack = 512;

// Tokens the splits of one (batch row, kv-head, row chunk) block must cover: all of
// [0, max_total), or with a sliding window only the window of its first query up to its last
// query's position, plus the rounding of window_begin.
inline long long split_span(const AttentionArgs& a, long long max_total) {
  if (a.window <= 0) return max_total;
  const long long span = a.window + a.q_len + kWindowSlack;
  return span < max_total ? span : max_total;
}

// First token the query at `position` sees: 0, or with a sliding window position + 1 - window.
__host__ __device__ inline long long window_first(const AttentionArgs& a, long long position) {
  const long long first = position + 1 - a.window;
  return a.window <= 0 || first <= 0 ? 0 : first;
}

// First token of a block whose first query sits at `position`: window_first rounded down to a
// multiple of `align` (at most kWindowSlack; later queries see less of the start, their rows
// mask it with window_first).
__host__ __device__ inline long long window_begin(const AttentionArgs& a, long long position, long long align) {
  return window_first(a, position) / align * align;
}

// Where an attention block sits. blockIdx.x walks (batch row, kv-head, row chunk), the chunk
// fastest so that the chunks of one head read its keys back to back (from L2); blockIdx.y is
// the token split. x holds 2^31 - 1 blocks where y and z stop at 65535, which a long GQA
// prefill passes (a 128k-token prompt with 4 query heads per kv-head makes 65536 chunks of 8).
struct BlockPlace {
  long long b, hk, row0;  // batch row, kv-head, first row of the GQA group's [group * q_len]
  int split;
};

__host__ __device__ inline long long row_chunks(const AttentionArgs& a, int rows_per_block) {
  return (a.q_heads / a.kv_heads * a.q_len + rows_per_block - 1) / rows_per_block;
}

inline dim3 attention_grid(const AttentionArgs& a, int rows_per_block, int splits) {
  return dim3(static_cast<unsigned>(a.batch * a.kv_heads * row_chunks(a, rows_per_block)), static_cast<unsigned>(splits));
}

__device__ __forceinline__ BlockPlace block_place(const AttentionArgs& a, int rows_per_block) {
  const long long chunks = row_chunks(a, rows_per_block);
  const long long unit = blockIdx.x / chunks;
  return BlockPlace{unit / a.kv_heads, unit % a.kv_heads, static_cast<long long>(blockIdx.x % chunks) * rows_per_block,
                    static_cast<int>(blockIdx.y)};
}

// Element d of query row o (its index in [B, Hq, Tq]) from a block that holds its unnormalized
// sum `acc`, running max m and softmax sum l: the output and (d = 0) the LSE when one split
// covers the whole range, else the split's partial (acc, m, l). Padding rows (valid false)
// get 0 and -inf.
template <typename T>
__device__ __forceinline__ void write_result(const AttentionArgs& a, float* partial, int split, long long o, int d,
                                             float acc, float m, float l, bool valid) {
  const long long D = a.head_dim;
  if (gridDim.y == 1) {  // one split (attention_grid)
    const bool some = valid && l > 0.0f;
    static_cast<T*>(a.out)[o * D + d] = from_float<T>(some ? acc / l : 0.0f);
    if (d == 0 && a.lse) a.lse[o] = some ? m + logf(l) : -INFINITY;
  } else {
    float* part = partial + (split * a.batch * a.q_heads * a.q_len + o) * (D + 2);
    part[d] = acc;
    if (d == 0) {
      part[D] = m;
      part[D + 1] = l;
    }
  }
}

}  // namespace cuda
}  // namespace effx
