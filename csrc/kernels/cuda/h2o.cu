// effx family: H2O, CUDA kernels (storage layout in include/effx/h2o.h): the score pass that
// follows the dense cache attention where it cannot score in the same pass (prefill chunks,
// trees; decode scores inside the attention), and eviction with slot reuse.
#include <cstdint>

#include "dtype.cuh"
#include "effx/h2o_cuda.h"

namespace effx {
namespace cuda {
namespace {

constexpr int kScoreTile = 64;     // tokens per block
constexpr int kScoreRows = 16;     // query rows staged at a time
constexpr int kScoreThreads = 256; // 4 threads per token

// Is new token j visible to new query i? (causal, tree or all; see attention.h)
__device__ __forceinline__ bool sees_new(const AttentionArgs& a, long long b, long long i, long long j, long long tn) {
  if (a.parents) {
    const int64_t* par = a.parents + b * a.parents_sb;
    for (long long x = i, steps = 0; x >= 0 && x < tn && steps <= i; x = par[x], ++steps) {
      if (x == j) return true;
    }
    return false;
  }
  return !a.causal || j <= i;
}

// Score blocks: one per (batch row, kv-head, token tile), on grid x alone (y would stop at
// 65535 tiles, a 4M-token cache); the tiles of one head run next to each other.
__host__ __device__ inline long long score_tiles(const AttentionArgs& a) {
  return (a.max_cached + a.q_len + kScoreTile - 1) / kScoreTile;
}

// scores[b, h, t] += sum over the group's query rows of exp(q.k_t * scale - lse_row), with
// the cached tokens from the dense cache and the new ones from k_new (their entries are set).
template <typename T>
__global__ void __launch_bounds__(kScoreThreads) score_kernel(AttentionArgs a, DenseKV kv) {
  extern __shared__ float smem[];
  const int D = static_cast<int>(a.head_dim);
  float* k_s = smem;                        // [kScoreTile][D + 1]
  float* q_s = k_s + kScoreTile * (D + 1);  // [kScoreRows][D]
  const long long unit = blockIdx.x / score_tiles(a), b = unit / a.kv_heads, hk = unit % a.kv_heads;
  const long long n = a.lengths[b * a.lengths_stride];
  long long tn = a.new_lengths ? a.new_lengths[b] : a.q_len;
  tn = tn < a.q_len ? tn : a.q_len;
  const long long total = n + tn, t0 = blockIdx.x % score_tiles(a) * kScoreTile;
  if (t0 >= total) return;
  const long long group = a.q_heads / a.kv_heads, rows = group * tn;
  const T* kc = static_cast<const T*>(kv.k) + b * kv.sb + hk * kv.sh;
  const T* kn = static_cast<const T*>(a.k_new.data) + b * a.k_new.sb + hk * a.k_new.sh;
  for (int idx = threadIdx.x; idx < kScoreTile * D; idx += blockDim.x) {
    const long long t = t0 + idx / D;
    const int d = idx % D;
    float x = 0.0f;
    if (t < n) x = to_float(kc[t * kv.st + d]);
    else if (t < total) x = to_float(kn[(t - n) * a.k_new.st + d]);
    k_s[(idx / D) * (D + 1) + d] = x;
  }
  const int j = threadIdx.x / 4, part = threadIdx.x % 4;
  const long long t = t0 + j;
  const T* q = static_cast<const T*>(a.q.data);
  float col = 0.0f;
  for (long long r0 = 0; r0 < rows; r0 += kScoreRows) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kScoreRows * D; idx += blockDim.x) {
      const long long r = r0 + idx / D;
      float x = 0.0f;
      if (r < rows) {
        const long long hq = hk * group + r % group, i = r / group;
        x = to_float(q[b * a.q.sb + hq * a.q.sh + i * a.q.st + idx % D]);
      }
      q_s[idx] = x;
    }
    __syncthreads();
    for (long long r = r0 + part; r < r0 + kScoreRows && r < rows; r += 4) {
      const long long hq = hk * group + r % group, i = r / group;
      if (t >= total || (t >= n && !sees_new(a, b, i, t - n, tn))) continue;
      float dot = 0.0f;
      const float* qr = q_s + (r - r0) * D;
      const float* kr = k_s + j * (D + 1);
      for (int d = 0; d < D; ++d) dot += qr[d] * kr[d];
      col += __expf(dot * a.sm_scale - a.lse[(b * a.q_heads + hq) * a.q_len + i]);
    }
  }
  col += __shfl_xor_sync(0xffffffffu, col, 1);
  col += __shfl_xor_sync(0xffffffffu, col, 2);
  if (part == 0 && t < total) {
    float* sc = a.scores + b * a.scores_sb + hk * a.scores_sh;
    sc[t] = t < n ? sc[t] + col : col;
  }
}

// Order-preserving key of (score, position): the eviction order, oldest first among ties.
__device__ __forceinline__ unsigned long long evict_key(float score, long long pos) {
  unsigned int bits = __float_as_uint(score);
  bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<unsigned long long>(bits) << 32) | static_cast<unsigned int>(pos);
}

// Exclusive prefix sum of `flag` over the block; returns this thread's offset, sets *total.
__device__ int block_exclusive_scan(int flag, int* warp_sums, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int x = flag;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int w = 0; w < warps; ++w) {
      const int s = warp_sums[w];
      warp_sums[w] = run;
      run += s;
    }
    *total = run;
  }
  __syncthreads();
  const int result = warp_sums[warp] + x - flag;
  __syncthreads();
  return result;
}

constexpr int kEvictThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kEvictThreads)
    evict_kernel(H2OStorage s, long long heavy, long long recent, int* hole_lists) {
  __shared__ unsigned long long count_s;
  __shared__ int warp_sums[kEvictThreads / 32];
  __shared__ int total_s;
  const long long bh = blockIdx.x, b = bh / s.heads, h = bh % s.heads;
  const long long n = s.state[b * 2], seen = s.state[b * 2 + 1], budget = heavy + recent;
  if (n <= budget) return;
  const long long evict = n - budget, cut = seen - recent;
  float* scores = s.scores + bh * s.capacity;
  int64_t* pos = s.positions + bh * s.capacity;

  // The evict-th smallest key among the non-recent tokens, one bit at a time (keys are unique).
  unsigned long long prefix = 0, remaining = static_cast<unsigned long long>(evict);
  for (int bit = 63; bit >= 0; --bit) {
    if (threadIdx.x == 0) count_s = 0;
    __syncthreads();
    const unsigned long long high = bit == 63 ? 0ull : ~0ull << (bit + 1);
    unsigned long long mine = 0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
      if (pos[i] >= cut) continue;
      const unsigned long long key = evict_key(scores[i], pos[i]);
      if ((key & high) == prefix && !((key >> bit) & 1ull)) ++mine;
    }
    atomicAdd(&count_s, mine);
    __syncthreads();
    const unsigned long long zeros = count_s;
    if (zeros < remaining) {
      remaining -= zeros;
      prefix |= 1ull << bit;
    }
    __syncthreads();
  }
  const unsigned long long kth = prefix;
  auto victim = [&](long long i) { return pos[i] < cut && evict_key(scores[i], pos[i]) <= kth; };

  // Victims below the budget are holes; survivors past it fill them, both in slot order.
  int* holes = hole_lists + bh * budget;
  int base = 0;
  for (long long c0 = 0; c0 < budget; c0 += blockDim.x) {
    const long long i = c0 + threadIdx.x;
    const int flag = i < budget && victim(i);
    const int at = block_exclusive_scan(flag, warp_sums, &total_s);
    if (flag) holes[base + at] = static_cast<int>(i);
    base += total_s;
  }
  __syncthreads();
  T* k = static_cast<T*>(s.k) + b * s.sb + h * s.sh;
  T* v = static_cast<T*>(s.v) + b * s.sb + h * s.sh;
  base = 0;
  for (long long c0 = budget; c0 < n; c0 += blockDim.x) {
    const long long i = c0 + threadIdx.x;
    const int flag = i < n && !victim(i);
    const int at = block_exclusive_scan(flag, warp_sums, &total_s);
    if (flag) {
      const long long dst = holes[base + at];
      for (long long d = 0; d < s.head_dim; ++d) {
        k[dst * s.st + d] = k[i * s.st + d];
        v[dst * s.st + d] = v[i * s.st + d];
      }
      scores[dst] = scores[i];
      pos[dst] = pos[i];
    }
    base += total_s;
  }
}

__global__ void clamp_held_kernel(H2OStorage s, long long budget) {
  const long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (b < s.batch && s.state[b * 2] > budget) s.state[b * 2] = budget;
}

template <typename T>
cudaError_t score_typed(const AttentionArgs& a, const DenseKV& kv, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kScoreTile * (a.head_dim + 1) + kScoreRows * a.head_dim);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(score_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = static_cast<unsigned>(a.batch * a.kv_heads * score_tiles(a));
  score_kernel<T><<<grid, kScoreThreads, smem, stream>>>(a, kv);
  return cudaGetLastError();
}

template <typename T>
cudaError_t evict_typed(const H2OStorage& s, int64_t heavy, int64_t recent, void* workspace, cudaStream_t stream) {
  if (s.batch * s.heads == 0) return cudaSuccess;  // a grid of no blocks is a launch error
  evict_kernel<T><<<static_cast<unsigned>(s.batch * s.heads), kEvictThreads, 0, stream>>>(
      s, heavy, recent, static_cast<int*>(workspace));
  clamp_held_kernel<<<static_cast<unsigned>((s.batch + 127) / 128), 128, 0, stream>>>(s, heavy + recent);
  return cudaGetLastError();
}

}  // namespace

cudaError_t h2o_attention(const AttentionArgs& a, const DenseKV& kv, DType dtype, void* workspace,
                          cudaStream_t stream) {
  if (a.lse == nullptr || a.scores == nullptr) return cudaErrorInvalidValue;
  if (dense_attention_scores(a, kv, dtype)) return dense_attention(a, kv, dtype, workspace, stream);
  AttentionArgs plain = a;
  plain.scores = nullptr;
  cudaError_t err = dense_attention(plain, kv, dtype, workspace, stream);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DType::Float32: return score_typed<float>(a, kv, stream);
    case DType::Float16: return score_typed<__half>(a, kv, stream);
    case DType::BFloat16: return score_typed<__nv_bfloat16>(a, kv, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

size_t h2o_evict_workspace_bytes(const H2OStorage& s) {
  return sizeof(int) * static_cast<size_t>(s.batch * s.heads * s.capacity);
}

cudaError_t h2o_evict(const H2OStorage& s, DType dtype, int64_t heavy, int64_t recent, void* workspace,
                      cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return evict_typed<float>(s, heavy, recent, workspace, stream);
    case DType::Float16: return evict_typed<__half>(s, heavy, recent, workspace, stream);
    case DType::BFloat16: return evict_typed<__nv_bfloat16>(s, heavy, recent, workspace, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace effx
