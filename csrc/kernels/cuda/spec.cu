// effx family: tree speculative decoding, CUDA kernels (semantics and layout in
// include/effx/spec.h). One block per row of distributions (sampling_probs) or per batch row
// (verification): the walk is sequential along the path, the per-node work (argmax, residual,
// renormalization, inverse CDF over the vocabulary) is spread over the block.
#include <cstdint>

#include "dtype.cuh"
#include "effx/spec_cuda.h"

namespace effx {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Sum over the block; every thread gets the result. `red` holds kThreads / 32 floats.
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // red may still be read by a previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) s += red[w];
  return s;
}

__device__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float s = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) s = fmaxf(s, red[w]);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sampling_probs_kernel(const T* logits, long long V, float temperature, float top_p, float* probs) {
  __shared__ float red[kThreads / 32];
  const T* x = logits + blockIdx.x * V;
  float* p = probs + blockIdx.x * V;
  float mx = -INFINITY;
  for (long long i = threadIdx.x; i < V; i += kThreads) mx = fmaxf(mx, to_float(x[i]));
  mx = block_max(mx, red);
  float s = 0.0f;
  for (long long i = threadIdx.x; i < V; i += kThreads) {
    const float e = expf((to_float(x[i]) - mx) / temperature);
    p[i] = e;
    s += e;
  }
  const float sum = block_sum(s, red);
  float pm = 0.0f;
  for (long long i = threadIdx.x; i < V; i += kThreads) {
    p[i] /= sum;
    pm = fmaxf(pm, p[i]);
  }
  if (!(top_p < 1.0f)) return;
  const float pmax = block_max(pm, red);
  // Largest threshold whose tokens at or above it hold mass >= top_p, by bisection on the bits
  // of positive floats (they order like unsigned ints): no sort of the vocabulary.
  unsigned lo = 0, hi = __float_as_uint(pmax);
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo + 1) / 2;
    const float tau = __uint_as_float(mid);
    float m = 0.0f;
    for (long long i = threadIdx.x; i < V; i += kThreads) m += p[i] >= tau ? p[i] : 0.0f;
    if (block_sum(m, red) >= top_p) lo = mid; else hi = mid - 1;
  }
  const float tau = __uint_as_float(lo);
  float m = 0.0f;
  for (long long i = threadIdx.x; i < V; i += kThreads) m += p[i] >= tau ? p[i] : 0.0f;
  const float kept = block_sum(m, red);
  for (long long i = threadIdx.x; i < V; i += kThreads) p[i] = p[i] >= tau ? p[i] / kept : 0.0f;
}

// First child of `cur` (index order) whose token is `want`, or -1; run by one thread.
__device__ long long find_child(const TreeArgs& t, const long long* tok, const long long* par, long long cur,
                                long long want) {
  for (long long j = cur + 1; j < t.nodes; ++j) {
    if (par[j] == cur && tok[j] >= 0 && tok[j] == want) return j;
  }
  return -1;
}

__device__ void finish_row(const TreeArgs& t, long long b, long long count, long long bonus) {
  for (long long j = count + threadIdx.x; j < t.nodes; j += blockDim.x) t.accepted[b * t.nodes + j] = -1;
  if (threadIdx.x == 0) {
    t.num_accepted[b] = count;
    t.bonus[b] = bonus;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) verify_greedy_kernel(TreeArgs t, const T* logits) {
  __shared__ float best_v[kThreads];
  __shared__ long long best_i[kThreads];
  __shared__ long long next_s;
  const long long b = blockIdx.x, N = t.nodes, V = t.vocab;
  const long long* tok = reinterpret_cast<const long long*>(t.tokens) + b * N;
  const long long* par = reinterpret_cast<const long long*>(t.parents) + b * t.parents_sb;
  long long cur = -1, count = 0, want = 0;
  for (;;) {
    const T* x = logits + (b * (N + 1) + cur + 1) * V;
    float v = -INFINITY;
    long long vi = -1;
    for (long long i = threadIdx.x; i < V; i += kThreads) {
      const float xi = to_float(x[i]);
      if (vi < 0 || xi > v) v = xi, vi = i;  // strided scan: the first maximum of this thread
    }
    best_v[threadIdx.x] = v;
    best_i[threadIdx.x] = vi;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) {
        const float ov = best_v[threadIdx.x + s];
        const long long oi = best_i[threadIdx.x + s];
        const float mv = best_v[threadIdx.x];
        const long long mi = best_i[threadIdx.x];
        // Lowest index among equal maxima; NaN never wins over a number.
        const bool take = oi >= 0 && (mi < 0 || ov > mv || (ov == mv && oi < mi) || (mv != mv && ov == ov));
        if (take) best_v[threadIdx.x] = ov, best_i[threadIdx.x] = oi;
      }
      __syncthreads();
    }
    want = best_i[0];
    if (threadIdx.x == 0) next_s = find_child(t, tok, par, cur, want);
    __syncthreads();
    const long long next = next_s;
    __syncthreads();  // best_* and next_s are rewritten by the next step
    if (next < 0) break;
    if (threadIdx.x == 0) t.accepted[b * N + count] = next;
    ++count;
    cur = next;
  }
  finish_row(t, b, count, want);
}

__global__ void verify_match_kernel(TreeArgs t, const long long* target_tokens) {
  const long long b = blockIdx.x, N = t.nodes;
  const long long* tok = reinterpret_cast<const long long*>(t.tokens) + b * N;
  const long long* par = reinterpret_cast<const long long*>(t.parents) + b * t.parents_sb;
  long long cur = -1, count = 0, want = target_tokens[b * (N + 1)];
  if (threadIdx.x == 0) {
    for (long long next; (next = find_child(t, tok, par, cur, want)) >= 0;) {
      t.accepted[b * N + count++] = next;
      cur = next;
      want = target_tokens[b * (N + 1) + cur + 1];
    }
    t.num_accepted[b] = count;
    t.bonus[b] = want;
    for (long long j = count; j < N; ++j) t.accepted[b * N + j] = -1;
  }
}

__global__ void __launch_bounds__(kThreads) verify_sample_kernel(TreeArgs t, const float* target_probs,
                                                                 const float* draft_probs, const float* uniforms,
                                                                 float* workspace) {
  __shared__ float red[kThreads / 32];
  __shared__ float chunk[kThreads];
  __shared__ long long drawn;
  const long long b = blockIdx.x, N = t.nodes, V = t.vocab, R = N + 1;
  const long long* tok = reinterpret_cast<const long long*>(t.tokens) + b * N;
  const long long* par = reinterpret_cast<const long long*>(t.parents) + b * t.parents_sb;
  const float* u = uniforms + b * R;
  float* p = workspace + b * 2 * V;
  float* q = p + V;
  long long cur = -1, count = 0;
  for (;;) {
    const float* p0 = target_probs + (b * R + cur + 1) * V;
    const float* q0 = draft_probs + (b * R + cur + 1) * V;
    for (long long i = threadIdx.x; i < V; i += kThreads) p[i] = p0[i], q[i] = q0[i];
    __syncthreads();
    long long next = -1;
    for (long long j = cur + 1; j < N; ++j) {  // uniform control flow: every thread reads the same values
      const long long x = tok[j];
      if (par[j] != cur || x < 0 || x >= V) continue;
      if (u[j + 1] * q[x] < p[x]) {
        next = j;
        break;
      }
      float s = 0.0f;
      for (long long i = threadIdx.x; i < V; i += kThreads) s += fmaxf(p[i] - q[i], 0.0f);
      s = block_sum(s, red);
      // p == q leaves no residual: the target's own distribution is still exact there.
      for (long long i = threadIdx.x; i < V; i += kThreads) p[i] = s > 0.0f ? fmaxf(p[i] - q[i], 0.0f) / s : p0[i];
      __syncthreads();
      if (threadIdx.x == 0) q[x] = 0.0f;
      __syncthreads();
      float sq = 0.0f;
      for (long long i = threadIdx.x; i < V; i += kThreads) sq += q[i];
      sq = block_sum(sq, red);
      if (sq > 0.0f) {
        for (long long i = threadIdx.x; i < V; i += kThreads) q[i] /= sq;
      }
      __syncthreads();
    }
    if (next >= 0) {
      if (threadIdx.x == 0) t.accepted[b * N + count] = next;
      ++count;
      cur = next;
      __syncthreads();  // p and q are reloaded for the child
      continue;
    }
    // Inverse CDF: contiguous chunks per thread, chunk sums scanned by one thread.
    const long long per = (V + kThreads - 1) / kThreads;
    const long long c0 = threadIdx.x * per, c1 = c0 + per < V ? c0 + per : V;
    float cs = 0.0f;
    for (long long i = c0; i < c1; ++i) cs += p[i];
    chunk[threadIdx.x] = cs;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int k = 0; k < kThreads; ++k) total += chunk[k];
      const float target = u[0] * total;
      float c = 0.0f;
      long long pick = -1, last = 0;
      for (int k = 0; k < kThreads && pick < 0; ++k) {
        if (c + chunk[k] <= target && k + 1 < kThreads) {
          c += chunk[k];
          continue;
        }
        for (long long i = k * per; i < (k + 1) * per && i < V; ++i) {
          if (p[i] <= 0.0f) continue;
          c += p[i];
          last = i;
          if (c > target) {
            pick = i;
            break;
          }
        }
      }
      if (pick < 0) {  // rounding left the target beyond the scanned mass: the last token with mass
        for (long long i = V - 1; i >= 0 && pick < 0; --i) pick = p[i] > 0.0f ? i : pick;
        if (pick < 0) pick = last;
      }
      drawn = pick;
    }
    __syncthreads();
    finish_row(t, b, count, drawn);
    return;
  }
}

template <typename T>
cudaError_t launch_probs(const void* logits, long long rows, long long V, float temperature, float top_p,
                         float* probs, cudaStream_t stream) {
  sampling_probs_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(static_cast<const T*>(logits), V,
                                                                                temperature, top_p, probs);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_greedy(const TreeArgs& t, const void* logits, cudaStream_t stream) {
  verify_greedy_kernel<T><<<static_cast<unsigned>(t.batch), kThreads, 0, stream>>>(t, static_cast<const T*>(logits));
  return cudaGetLastError();
}

}  // namespace

cudaError_t sampling_probs(const void* logits, DType dtype, int64_t rows, int64_t vocab, float temperature,
                           float top_p, float* probs, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_probs<float>(logits, rows, vocab, temperature, top_p, probs, stream);
    case DType::Float16: return launch_probs<__half>(logits, rows, vocab, temperature, top_p, probs, stream);
    case DType::BFloat16: return launch_probs<__nv_bfloat16>(logits, rows, vocab, temperature, top_p, probs, stream);
    case DType::Float64: break;  // not an activation dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

cudaError_t verify_greedy(const TreeArgs& t, const void* logits, DType dtype, cudaStream_t stream) {
  if (t.batch == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_greedy<float>(t, logits, stream);
    case DType::Float16: return launch_greedy<__half>(t, logits, stream);
    case DType::BFloat16: return launch_greedy<__nv_bfloat16>(t, logits, stream);
    case DType::Float64: break;  // not an activation dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

cudaError_t verify_match(const TreeArgs& t, const int64_t* target_tokens, cudaStream_t stream) {
  if (t.batch == 0) return cudaSuccess;
  verify_match_kernel<<<static_cast<unsigned>(t.batch), 32, 0, stream>>>(
      t, reinterpret_cast<const long long*>(target_tokens));
  return cudaGetLastError();
}

size_t verify_sample_workspace_bytes(const TreeArgs& t) { return sizeof(float) * 2 * t.batch * t.vocab; }

cudaError_t verify_sample(const TreeArgs& t, const float* target_probs, const float* draft_probs,
                          const float* uniforms, void* workspace, cudaStream_t stream) {
  if (t.batch == 0) return cudaSuccess;
  verify_sample_kernel<<<static_cast<unsigned>(t.batch), kThreads, 0, stream>>>(
      t, target_probs, draft_probs, uniforms, static_cast<float*>(workspace));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace effx
