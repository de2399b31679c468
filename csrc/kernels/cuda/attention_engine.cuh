// effx: the CUDA engine behind every fused cache attention (include/effx/attention.h).
// A block owns (token split, batch row, kv-head, up to kRows query rows of the GQA group) and
// walks its token range in tiles of kTile tokens: the cache policy stages keys (transposed,
// [D][kTile + 1]) and values ([kTile][D]) in shared memory as fp32, the engine appends the
// step's new tokens, scores every (row, token) pair, and updates an online softmax (running
// max and sum per row, rescaled per tile). With several splits, each writes (max, sum, acc)
// partials and a second kernel merges them with the same rescaling (flash-decoding).
// Over a policy that can hand out row pointers, one-token decode takes the register path of
// attention_decode.cuh instead, and fp16/bf16 calls with more rows the tensor-core path of
// attention_mma.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attention_decode.cuh"
#include "attention_mma.cuh"
#include "dtype.cuh"
#include "effx/attention.h"

namespace effx {
namespace cuda {

constexpr int kRows = 8;  // query rows per block: one warp per row in the softmax step
constexpr int kThreads = kRows * 32;
constexpr int kTile = 32;
constexpr int kMaxHeadDim = 256;
constexpr int kAccPerThread = kRows * kMaxHeadDim / kThreads;

struct AttentionPlan {
  int splits;
  long long tokens_per_split;
  int row_chunks;
  size_t smem_bytes;
  size_t workspace_bytes;
};

// EFFX_CUDA_ATTENTION=engine sends every call to the fp32 shared-memory engine: the reference
// the fast paths are compared with (benchmarks, a suspected fast-path bug on new hardware).
inline bool fast_paths_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("EFFX_CUDA_ATTENTION");
    return v == nullptr || std::strcmp(v, "engine") != 0;
  }();
  return enabled;
}

// The fast paths plan one wave of blocks from the kernel's occupancy, counted up to this many
// per multiprocessor (their workspaces are sized for it).
constexpr int kMaxResident = 4;

template <typename K>
long long slots_for(K* kernel, int threads, size_t smem) {
  int blocks = 1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess || blocks < 1) {
    blocks = 1;
  }
  return static_cast<long long>(multiprocessors()) * (blocks < kMaxResident ? blocks : kMaxResident);
}

// slots_for, asked once per kernel (an occupancy query per decode step and layer would cost
// microseconds on a call that takes tens of them). For kernels without dynamic shared memory.
template <auto Kernel>
long long cached_slots(int threads) {
  static const long long slots = slots_for(Kernel, threads, 0);
  return slots;
}

inline size_t partial_bytes(const AttentionArgs& a, int splits) {
  return splits > 1 ? sizeof(float) * splits * a.batch * a.q_heads * a.q_len * (a.head_dim + 2) : 0;
}

inline AttentionPlan plan_attention(const AttentionArgs& a) {
  const int sms = multiprocessors();
  AttentionPlan p;
  p.row_chunks = static_cast<int>(row_chunks(a, kRows));
  const long long units = a.batch * a.kv_heads * p.row_chunks;
  const long long max_total = split_span(a, a.max_cached + a.q_len);
  // Enough blocks for two waves, but no split shorter than 8 tiles.
  long long splits = (2LL * sms + units - 1) / units;
  const long long most = (max_total + 8 * kTile - 1) / (8 * kTile);
  splits = splits < most ? splits : most;
  p.splits = static_cast<int>(splits < 1 ? 1 : splits);
  const long long per = (max_total + p.splits - 1) / p.splits;
  p.tokens_per_split = (per + kTile - 1) / kTile * kTile;
  const long long mask_words = a.parents ? (a.q_len + 31) / 32 : 0;
  p.smem_bytes = sizeof(float) * (kRows * a.head_dim + a.head_dim * (kTile + 1) + kTile * a.head_dim +
                                   kRows * kTile + 3 * kRows) +
                 sizeof(uint32_t) * kRows * (mask_words + 1);
  // Enough for the fast paths too, which the caller cannot tell apart.
  const long long slots = static_cast<long long>(sms) * kMaxResident;
  const size_t engine = partial_bytes(a, p.splits),
               fast = a.q_len == 1 ? partial_bytes(a, decode::plan(a, slots).splits) + decode::raw_scores_bytes(a) : 0,
               tensor = partial_bytes(a, mma::plan(a, slots).splits);
  p.workspace_bytes = engine > fast ? engine : fast;
  p.workspace_bytes = p.workspace_bytes > tensor ? p.workspace_bytes : tensor;
  return p;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Cached: a policy with
//   __device__ void load(b, h, t0, t1, float* kt, int ldk, float* v) const: the whole block
//   stages cached tokens [t0, t1): kt[d * ldk + t - t0], v[(t - t0) * D + d].
template <typename T, typename Cached>
__global__ void __launch_bounds__(kThreads)
    attention_kernel(AttentionArgs a, Cached cached, long long tokens_per_split, float* partial) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(a.head_dim);
  const int ldk = kTile + 1;
  float* q_s = smem;
  float* kt_s = q_s + kRows * D;
  float* v_s = kt_s + D * ldk;
  float* s_s = v_s + kTile * D;
  float* m_s = s_s + kRows * kTile;
  float* l_s = m_s + kRows;
  float* alpha_s = l_s + kRows;
  uint32_t* anc_s = reinterpret_cast<uint32_t*>(alpha_s + kRows);
  const int mask_words = a.parents ? static_cast<int>((a.q_len + 31) / 32) : 0;
  int* depth_s = reinterpret_cast<int*>(anc_s + kRows * mask_words);  // tree rows: position n + depth

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const BlockPlace at = block_place(a, kRows);
  const int split = at.split;
  const long long b = at.b, hk = at.hk;
  const long long group = a.q_heads / a.kv_heads;
  const long long n = a.lengths[b * a.lengths_stride];
  long long tn = a.new_lengths ? a.new_lengths[b] : a.q_len;
  tn = tn < a.q_len ? tn : a.q_len;
  const long long row0 = at.row0;
  // Row r of the block: query i = (row0 + r) / group of head hk * group + (row0 + r) % group.
  auto row_query = [&](int r) { return (row0 + r) / group; };
  auto row_valid = [&](int r) { return row0 + r < group * a.q_len && row_query(r) < tn; };

  const T* q = static_cast<const T*>(a.q.data);
  for (int idx = tid; idx < kRows * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float v = 0.0f;
    if (row_valid(r)) {
      const long long hq = hk * group + (row0 + r) % group;
      v = to_float(q[b * a.q.sb + hq * a.q.sh + row_query(r) * a.q.st + d]) * a.sm_scale;
    }
    q_s[idx] = v;
  }
  if (tid < kRows) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
    if (a.parents) {
      uint32_t* bits = anc_s + tid * mask_words;
      for (int w = 0; w < mask_words; ++w) bits[w] = 0;
      if (row_valid(tid)) {
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
  }
  // A tree no deeper than the window (checked by the op) hides only cached tokens.
  auto position = [&](int r) { return n + (a.parents ? depth_s[r] : row_query(r)); };
  // New tokens seen by the block's last valid row.
  long long last_query = -1;
  for (int r = 0; r < kRows; ++r) last_query = row_valid(r) ? row_query(r) : last_query;
  const long long new_seen = last_query < 0 ? 0 : ((a.causal || a.parents) ? last_query + 1 : tn);
  const long long total = last_query < 0 ? 0 : n + new_seen;
  const long long begin = window_begin(a, a.parents ? n : n + row_query(0), kTile) + split * tokens_per_split;
  const long long end = begin + tokens_per_split < total ? begin + tokens_per_split : total;

  float acc[kAccPerThread];
#pragma unroll
  for (int k = 0; k < kAccPerThread; ++k) acc[k] = 0.0f;
  const T* k_new = static_cast<const T*>(a.k_new.data);
  const T* v_new = static_cast<const T*>(a.v_new.data);
  __syncthreads();

  for (long long t0 = begin; t0 < end; t0 += kTile) {
    const long long t1 = t0 + kTile < end ? t0 + kTile : end;
    const long long c1 = t1 < n ? t1 : n;
    if (t0 < c1) cached.load(b, hk, t0, c1, kt_s, ldk, v_s);
    const long long first_new = t0 > n ? t0 : n;
    for (long long idx = tid; idx < (t1 - first_new) * D; idx += kThreads) {
      const long long t = first_new + idx / D;
      const int d = static_cast<int>(idx % D);
      kt_s[d * ldk + (t - t0)] = to_float(k_new[b * a.k_new.sb + hk * a.k_new.sh + (t - n) * a.k_new.st + d]);
      v_s[(t - t0) * D + d] = to_float(v_new[b * a.v_new.sb + hk * a.v_new.sh + (t - n) * a.v_new.st + d]);
    }
    __syncthreads();
    for (int idx = tid; idx < kRows * kTile; idx += kThreads) {
      const int r = idx / kTile, j = idx % kTile;
      const long long t = t0 + j;
      float score = -INFINITY;
      if (t < t1 && row_valid(r)) {
        bool visible = t >= window_first(a, position(r));
        if (visible && t >= n) {
          const long long jn = t - n;
          visible = a.parents ? ((anc_s[r * mask_words + jn / 32] >> (jn % 32)) & 1u)
                              : (!a.causal || jn <= row_query(r));
        }
        if (visible) {
          float dot = 0.0f;
          for (int d = 0; d < D; ++d) dot += q_s[r * D + d] * kt_s[d * ldk + j];
          score = dot;
        }
      }
      s_s[idx] = score;
    }
    __syncthreads();
    {
      const int r = warp;
      const float s = s_s[r * kTile + lane];  // kTile == 32: one token per lane
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float p = m_new == -INFINITY ? 0.0f : __expf(s - m_new);
      const float sum = warp_sum(p);
      s_s[r * kTile + lane] = p;
      if (lane == 0) {
        const float alpha = m_new == -INFINITY ? 1.0f : __expf(m_old - m_new);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
    // Only the tile's staged rows: the rest of v_s is stale or never written (0 * NaN is NaN).
    const int staged = static_cast<int>(t1 - t0);
#pragma unroll
    for (int k = 0; k < kAccPerThread; ++k) {
      const int idx = tid + k * kThreads;
      if (idx < kRows * D) {
        const int r = idx / D, d = idx % D;
        float x = acc[k] * alpha_s[r];
        for (int j = 0; j < staged; ++j) x += s_s[r * kTile + j] * v_s[j * D + d];
        acc[k] = x;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int k = 0; k < kAccPerThread; ++k) {
    const int idx = tid + k * kThreads;
    if (idx >= kRows * D || row0 + idx / D >= group * a.q_len) continue;
    const int r = idx / D, d = idx % D;
    const long long hq = hk * group + (row0 + r) % group, i = row_query(r);
    write_result<T>(a, partial, split, (b * a.q_heads + hq) * a.q_len + i, d, acc[k], m_s[r], l_s[r], row_valid(r));
  }
}

// Merges the splits' partials of one (batch, head, query) per block.
template <typename T>
__global__ void combine_kernel(AttentionArgs a, int splits, const float* partial) {
  const long long o = blockIdx.x;
  const long long b = o / (a.q_heads * a.q_len), i = o % a.q_len;
  const int D = static_cast<int>(a.head_dim);
  long long tn = a.new_lengths ? a.new_lengths[b] : a.q_len;
  const bool valid = i < tn;
  const long long stride = a.batch * a.q_heads * a.q_len * (D + 2);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, partial[s * stride + o * (D + 2) + D]);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float* part = partial + s * stride + o * (D + 2);
    if (part[D] != -INFINITY) l += part[D + 1] * __expf(part[D] - m);
  }
  T* out = static_cast<T*>(a.out);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float x = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float* part = partial + s * stride + o * (D + 2);
      if (part[D] != -INFINITY) x += part[d] * __expf(part[D] - m);
    }
    out[o * D + d] = from_float<T>(valid && l > 0.0f ? x / l : 0.0f);
  }
  if (threadIdx.x == 0 && a.lse) a.lse[o] = valid && l > 0.0f ? m + logf(l) : -INFINITY;
}

// Policies with `key(b, h, t)` / `value(b, h, t)` row pointers (and `rows_aligned(a)`) can
// take the decode path; with `stage_tile` (and `tiles_aligned(a)`) the tensor-core path.
template <typename C, typename = void>
struct has_rows : std::false_type {};
template <typename C>
struct has_rows<C, std::void_t<decltype(&C::key), decltype(&C::value)>> : std::true_type {};
template <typename C, typename = void>
struct has_tiles : std::false_type {};
template <typename C>
struct has_tiles<C, std::void_t<decltype(&C::stage_tile)>> : std::true_type {};

template <typename T, int ROWS, int TPT, typename Rows>
cudaError_t run_decode_with(const AttentionArgs& a, const Rows& cached, void* workspace, cudaStream_t stream) {
  auto kernel = decode::decode_kernel<T, ROWS, TPT, Rows>;
  const decode::Plan p = decode::plan(a, cached_slots<decode::decode_kernel<T, ROWS, TPT, Rows>>(decode::kThreads));
  float* partial = static_cast<float*>(workspace);
  float* raw = a.scores ? reinterpret_cast<float*>(static_cast<char*>(workspace) + partial_bytes(a, p.splits)) : nullptr;
  const dim3 grid = attention_grid(a, ROWS, p.splits);
  kernel<<<grid, decode::kThreads, 0, stream>>>(a, cached, p.tokens_per_split, partial, raw, p.raw_stride);
  if (p.splits > 1) {
    combine_kernel<T><<<static_cast<unsigned>(a.batch * a.q_heads), 128, 0, stream>>>(a, p.splits, partial);
  }
  if (raw) {
    const dim3 sgrid(static_cast<unsigned>(a.batch * a.kv_heads), static_cast<unsigned>((a.max_cached + 1 + 255) / 256));
    decode::scores_kernel<256><<<sgrid, 256, 0, stream>>>(a, raw, p.raw_stride);
  }
  return cudaGetLastError();
}

template <typename T, int ROWS, typename Rows>
cudaError_t run_decode_rows(const AttentionArgs& a, const Rows& cached, void* workspace, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return run_decode_with<T, ROWS, 8>(a, cached, workspace, stream);
    case 128: return run_decode_with<T, ROWS, 16>(a, cached, workspace, stream);
    case 256: return run_decode_with<T, ROWS, 32>(a, cached, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Rows>
cudaError_t run_decode(const AttentionArgs& a, const Rows& cached, void* workspace, cudaStream_t stream) {
  switch (decode::rows_for(a)) {
    case 1: return run_decode_rows<T, 1>(a, cached, workspace, stream);
    case 2: return run_decode_rows<T, 2>(a, cached, workspace, stream);
    case 4: return run_decode_rows<T, 4>(a, cached, workspace, stream);
    default: return run_decode_rows<T, 8>(a, cached, workspace, stream);
  }
}

// Whether the tensor-core kernel's shared memory for this call (its tree mask included) fits
// the GPU: at D = 128 a tree of more than 672 new tokens does not on sm_86/89.
inline bool mma_fits(const AttentionArgs& a) {
  const int words = mma::tree_words(a);
  return (a.head_dim == 64 ? mma::Layout<64>::bytes(words) : mma::Layout<128>::bytes(words)) <= smem_optin();
}

// The tensor-core kernel's shared-memory opt-in at the largest size a call may need (the
// deepest tree mask, or all the GPU allows: mma_fits keeps deeper trees off this path), and
// its occupancy. A speculative step calls this per layer, so it is done once; but the opt-in
// belongs to each device's context, so once per device, and a failure is not remembered.
template <typename T, int D, typename Rows>
cudaError_t mma_setup(long long* slots) {
  constexpr int kDevices = 64;
  static std::atomic<bool> opted_in[kDevices];
  static const size_t most = std::min(mma::Layout<D>::bytes(mma::kMaxTreeWords), smem_optin());
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool known = device >= 0 && device < kDevices;
  if (!known || !opted_in[device].load(std::memory_order_acquire)) {
    err = cudaFuncSetAttribute(mma::mma_kernel<T, D, Rows>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(most));
    if (err != cudaSuccess) return err;
    if (known) opted_in[device].store(true, std::memory_order_release);
  }
  static const long long resident = slots_for(mma::mma_kernel<T, D, Rows>, mma::kThreads, most);
  *slots = resident;
  return cudaSuccess;
}

template <typename T, int D, typename Rows>
cudaError_t run_mma_dim(const AttentionArgs& a, const Rows& cached, void* workspace, cudaStream_t stream) {
  auto kernel = mma::mma_kernel<T, D, Rows>;
  long long slots = 0;
  const cudaError_t err = mma_setup<T, D, Rows>(&slots);
  if (err != cudaSuccess) return err;
  const size_t smem = mma::Layout<D>::bytes(mma::tree_words(a));
  const mma::Plan p = mma::plan(a, slots);
  const dim3 grid = attention_grid(a, mma::kRows, p.splits);
  float* partial = static_cast<float*>(workspace);
  kernel<<<grid, mma::kThreads, smem, stream>>>(a, cached, p.tokens_per_split, p.mask_words, partial);
  if (p.splits > 1) {
    combine_kernel<T><<<static_cast<unsigned>(a.batch * a.q_heads * a.q_len), 128, 0, stream>>>(a, p.splits, partial);
  }
  return cudaGetLastError();
}

// H2O scores (a.scores) are accumulated by the decode path only; elsewhere the caller runs
// its own scoring pass (h2o.cu), and a call with scores set is an error.
template <typename T, typename Cached>
cudaError_t run_attention(const AttentionArgs& a, const Cached& cached, void* workspace, cudaStream_t stream) {
  if (a.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const bool fast = fast_paths_enabled();
  if constexpr (has_rows<Cached>::value) {
    if (fast && decode::eligible(a, cached.rows_aligned(a))) return run_decode<T>(a, cached, workspace, stream);
  }
  if constexpr (has_tiles<Cached>::value && !std::is_same<T, float>::value) {
    if (fast && mma::eligible(a, cached.tiles_aligned(a)) && mma_fits(a)) {
      return a.head_dim == 64 ? run_mma_dim<T, 64>(a, cached, workspace, stream)
                              : run_mma_dim<T, 128>(a, cached, workspace, stream);
    }
  }
  if (a.scores) return cudaErrorInvalidValue;
  const AttentionPlan p = plan_attention(a);
  auto kernel = attention_kernel<T, Cached>;
  if (p.smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid = attention_grid(a, kRows, p.splits);
  kernel<<<grid, kThreads, p.smem_bytes, stream>>>(a, cached, p.tokens_per_split, static_cast<float*>(workspace));
  if (p.splits > 1) {
    combine_kernel<T><<<static_cast<unsigned>(a.batch * a.q_heads * a.q_len), 128, 0, stream>>>(
        a, p.splits, static_cast<const float*>(workspace));
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace effx
