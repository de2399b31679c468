// effx: the tensor-core path of the CUDA cache attention, for fp16/bf16 caches and many query
// rows per kv-head (prefill chunks, token trees, GQA groups of several new tokens). A block of
// four warps owns (token split, batch row, kv-head, 64 query rows) and walks its tokens in
// tiles of 64: keys and values staged in shared memory in the storage dtype (by the cache
// policy: copied, or dequantized for KIVI), S = Q K^T and O += P V on
// WMMA 16x16x16 with fp32 accumulation, the online softmax (and the causal or tree mask) in
// fp32 between them. O lives in shared memory because a WMMA accumulator cannot be rescaled
// row by row. Splits of the token range merge in the engine's combine kernel.
#pragma once

#include <mma.h>

#include <cstdint>

#include "dtype.cuh"
#include "effx/attention.h"
#include "splits.cuh"

namespace effx {
namespace cuda {
namespace mma {

constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // query rows per block
constexpr int kTile = 64;           // tokens per tile
constexpr int kMinTokensPerSplit = 256;
constexpr int kMaxTreeWords = 32;   // tree masks up to 1024 new tokens

// Shared memory of a block, in order; every region starts 128-byte aligned for WMMA. The
// queries are only read into registers before the first tile, so they share S's region:
// about 96 KB at D = 128, two blocks per multiprocessor.
template <int D>
struct Layout {
  static constexpr int ldh = D + 8;        // Q, K, V tiles (16-bit)
  static constexpr int lds = kTile + 4;    // S (fp32)
  static constexpr int ldp = kTile + 8;    // P (16-bit)
  static constexpr int ldo = D + 4;        // O (fp32)
  static_assert(2 * ldh <= 4 * lds, "Q must fit in S's region");
  static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t k = 0;
  static constexpr size_t v = align(k + 2 * kTile * ldh);
  static constexpr size_t s = align(v + 2 * kTile * ldh);
  static constexpr size_t q = s;
  static constexpr size_t p = align(s + 4 * kRows * lds);
  static constexpr size_t o = align(p + 2 * kRows * ldp);
  static constexpr size_t stats = align(o + 4 * kRows * ldo);  // m, l per row
  static constexpr size_t tree = align(stats + 4 * 2 * kRows);  // a depth, then the ancestor mask, per row
  static constexpr size_t bytes(int mask_words) { return tree + 4 * kRows * (1 + mask_words); }
};

struct Plan {
  int row_blocks;
  int splits;
  long long tokens_per_split;
  int mask_words;
};

inline int tree_words(const AttentionArgs& a) { return a.parents ? static_cast<int>((a.q_len + 31) / 32) : 0; }

// slots: blocks the device runs at once; one wave of them (see decode::plan).
inline Plan plan(const AttentionArgs& a, long long slots) {
  Plan p;
  p.row_blocks = static_cast<int>(row_chunks(a, kRows));
  const Splits s =
      one_wave(split_span(a, a.max_cached + a.q_len), a.batch * a.kv_heads * p.row_blocks, slots,
               kMinTokensPerSplit, kTile);
  p.splits = s.count;
  p.tokens_per_split = s.tokens;
  p.mask_words = tree_words(a);
  return p;
}

// Is the tensor-core path possible for this call (16-bit storage; `aligned`: the rows the
// kernel and the policy copy in 16-byte chunks are aligned)?
inline bool eligible(const AttentionArgs& a, bool aligned) {
  return aligned && a.scores == nullptr && (a.head_dim == 64 || a.head_dim == 128) &&
         (a.parents == nullptr || a.q_len <= 32 * kMaxTreeWords);
}

// One 16-byte chunk (8 elements).
template <typename T>
__device__ __forceinline__ void copy8(T* dst, const T* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

// Tiles: a policy with
//   __device__ void stage_tile(b, h, t0, t1, T* k, T* v, int ld) const: the whole block
//   stages cached tokens [t0, t1) as k[(t - t0) * ld + d], v[(t - t0) * ld + d].
// The kernel stages the step's new tokens itself (16-byte copies: their rows must be aligned).
template <typename T, int D, typename Tiles>
__global__ void __launch_bounds__(kThreads)
    mma_kernel(AttentionArgs a, Tiles cached, long long tokens_per_split, int mask_words, float* partial) {
  using namespace nvcuda;
  using L = Layout<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + L::q);
  T* k_s = reinterpret_cast<T*>(smem + L::k);
  T* v_s = reinterpret_cast<T*>(smem + L::v);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  T* p_s = reinterpret_cast<T*>(smem + L::p);
  float* o_s = reinterpret_cast<float*>(smem + L::o);
  float* m_s = reinterpret_cast<float*>(smem + L::stats);
  float* l_s = m_s + kRows;
  int* depth_s = reinterpret_cast<int*>(smem + L::tree);
  uint32_t* anc_s = reinterpret_cast<uint32_t*>(depth_s + kRows);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const BlockPlace at = block_place(a, kRows);
  const int split = at.split;
  const long long b = at.b, hk = at.hk;
  const long long group = a.q_heads / a.kv_heads, rows = group * a.q_len;
  const long long n = a.lengths[b * a.lengths_stride];
  long long tn = a.new_lengths ? a.new_lengths[b] : a.q_len;
  tn = tn < a.q_len ? tn : a.q_len;
  const long long row0 = at.row0;
  // Row r of the block: query i = (row0 + r) / group of head hk * group + (row0 + r) % group.
  auto row_query = [&](long long r) { return (row0 + r) / group; };
  auto row_valid = [&](long long r) { return row0 + r < rows && row_query(r) < tn; };

  // Queries as stored (the scale is applied to S in fp32), zero for padding rows.
  const T* q = static_cast<const T*>(a.q.data) + b * a.q.sb;
  for (int idx = tid; idx < kRows * D / 8; idx += kThreads) {
    const int r = idx / (D / 8), d = idx % (D / 8) * 8;
    T* dst = q_s + r * L::ldh + d;
    if (row_valid(r)) {
      const T* src = q + (hk * group + (row0 + r) % group) * a.q.sh + row_query(r) * a.q.st + d;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = src[e];  // q rows need not be 16-byte aligned
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = from_float<T>(0.0f);
    }
  }
  for (int idx = tid; idx < kRows * D; idx += kThreads) o_s[idx / D * L::ldo + idx % D] = 0.0f;
  if (tid < kRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
    uint32_t* bits = anc_s + tid * mask_words;
    for (int w = 0; w < mask_words; ++w) bits[w] = 0;
    if (a.parents && row_valid(tid)) {
      const int64_t* par = a.parents + b * a.parents_sb;
      const long long i = row_query(tid);
      // parents[j] < j is checked by the caller; the step bound keeps a bad tree from hanging.
      long long steps = 0;
      for (long long j = i; j >= 0 && j < tn && steps <= i; j = par[j], ++steps) {
        bits[j / 32] |= 1u << (j % 32);
      }
      depth_s[tid] = static_cast<int>(steps - 1);
    }
  }
  // A tree no deeper than the window (checked by the op) hides only cached tokens.
  auto position = [&](long long r) { return n + (a.parents ? depth_s[r] : row_query(r)); };
  // New tokens seen by the block's last valid row bound the token range.
  long long last_query = -1;
  for (int r = kRows - 1; r >= 0 && last_query < 0; --r) last_query = row_valid(r) ? row_query(r) : -1;
  const long long new_seen = last_query < 0 ? 0 : ((a.causal || a.parents) ? last_query + 1 : tn);
  const long long total = last_query < 0 ? 0 : n + new_seen;
  const long long begin = window_begin(a, a.parents ? n : n + row_query(0), kTile) + split * tokens_per_split;
  const long long end = begin + tokens_per_split < total ? begin + tokens_per_split : total;
  __syncthreads();

  // This warp's 16 query rows stay in registers as WMMA operands.
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(qf[kk], q_s + warp * 16 * L::ldh + kk * 16, L::ldh);

  const T* k_new = static_cast<const T*>(a.k_new.data) + b * a.k_new.sb + hk * a.k_new.sh;
  const T* v_new = static_cast<const T*>(a.v_new.data) + b * a.v_new.sb + hk * a.v_new.sh;
  for (long long t0 = begin; t0 < end; t0 += kTile) {
    const long long t1 = t0 + kTile < end ? t0 + kTile : end, c1 = t1 < n ? t1 : n;
    if (t0 < c1) cached.stage_tile(b, hk, t0, c1, k_s, v_s, L::ldh);
    for (int idx = tid; idx < kTile * D / 8; idx += kThreads) {
      const int j = idx / (D / 8), d = idx % (D / 8) * 8;
      const long long t = t0 + j;
      if (t < n && t < t1) continue;  // staged by the policy
      if (t < t1) {
        copy8(k_s + j * L::ldh + d, k_new + (t - n) * a.k_new.st + d);
        copy8(v_s + j * L::ldh + d, v_new + (t - n) * a.v_new.st + d);
      } else {  // zeros, not stale rows: P is 0 there but 0 * NaN is NaN
        *reinterpret_cast<uint4*>(k_s + j * L::ldh + d) = make_uint4(0u, 0u, 0u, 0u);
        *reinterpret_cast<uint4*>(v_s + j * L::ldh + d) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    __syncthreads();

    // S (16 rows x 64 tokens per warp) = Q K^T.
#pragma unroll
    for (int f = 0; f < kTile / 16; ++f) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, k_s + f * 16 * L::ldh + kk * 16, L::ldh);
        wmma::mma_sync(sf, qf[kk], kf, sf);
      }
      wmma::store_matrix_sync(s_s + warp * 16 * L::lds + f * 16, sf, L::lds, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of the warp's rows: two lanes per row, 32 tokens each.
    {
      const int rr = warp * 16 + lane / 2, half = lane % 2;
      const bool valid = row_valid(rr);
      const long long i = row_query(rr), first = valid ? window_first(a, position(rr)) : 0;
      float* srow = s_s + rr * L::lds + half * 32;
      float mx = -INFINITY;
      for (int j = 0; j < 32; ++j) {
        const long long t = t0 + half * 32 + j;
        bool visible = valid && t < t1 && t >= first;
        if (visible && t >= n) {
          const long long jn = t - n;
          visible = a.parents ? ((anc_s[rr * mask_words + jn / 32] >> (jn % 32)) & 1u) : (!a.causal || jn <= i);
        }
        const float x = visible ? srow[j] * a.sm_scale : -INFINITY;
        srow[j] = x;
        mx = fmaxf(mx, x);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_old = m_s[rr], m_new = fmaxf(m_old, mx);
      const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_old - m_new);
      float sum = 0.0f;
      T* prow = p_s + rr * L::ldp + half * 32;
      for (int j = 0; j < 32; ++j) {
        const float pj = m_new == -INFINITY ? 0.0f : __expf(srow[j] - m_new);
        sum += pj;
        prow[j] = from_float<T>(pj);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      float* orow = o_s + rr * L::ldo + half * (D / 2);
      for (int d = 0; d < D / 2; ++d) orow[d] *= alpha;
      __syncwarp();
      if (half == 0) {
        l_s[rr] = l_s[rr] * alpha + sum;
        m_s[rr] = m_new;
      }
    }
    __syncwarp();

    // O (16 rows x D per warp) += P V.
#pragma unroll
    for (int f = 0; f < D / 16; ++f) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      float* o_tile = o_s + warp * 16 * L::ldo + f * 16;
      wmma::load_matrix_sync(of, o_tile, L::ldo, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(pf, p_s + warp * 16 * L::ldp + kk * 16, L::ldp);
        wmma::load_matrix_sync(vf, v_s + kk * 16 * L::ldh + f * 16, L::ldh);
        wmma::mma_sync(of, pf, vf, of);
      }
      wmma::store_matrix_sync(o_tile, of, L::ldo, wmma::mem_row_major);
    }
    __syncthreads();  // k_s, v_s are restaged next
  }

  for (int idx = tid; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    if (row0 + r >= rows) continue;
    const long long hq = hk * group + (row0 + r) % group, i = row_query(r);
    write_result<T>(a, partial, split, (b * a.q_heads + hq) * a.q_len + i, d, o_s[r * L::ldo + d], m_s[r], l_s[r],
                    row_valid(r));
  }
}

}  // namespace mma
}  // namespace cuda
}  // namespace effx
