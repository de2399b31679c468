// effx: fused attention over a plain (dense) KV cache plus the step's new tokens, CUDA.
#include "attention_engine.cuh"
#include "effx/attention_cuda.h"

namespace effx {
namespace cuda {
namespace {

template <typename T>
struct DenseCached {
  const T* k;
  const T* v;
  long long sb, sh, st;
  int D;

  __device__ const T* key(long long b, long long h, long long t) const { return k + b * sb + h * sh + t * st; }
  __device__ const T* value(long long b, long long h, long long t) const { return v + b * sb + h * sh + t * st; }
  bool rows_aligned(const AttentionArgs& a) const {
    const int64_t strides[3] = {sb, sh, st};
    return decode::rows_aligned(a, sizeof(T), k, v, strides);
  }
  bool tiles_aligned(const AttentionArgs& a) const { return rows_aligned(a); }

  // Rows as stored, 16 bytes per thread and step.
  __device__ void stage_tile(long long b, long long h, long long t0, long long t1, T* ks, T* vs, int ld) const {
    const int chunks = D / 8;
    for (long long idx = threadIdx.x; idx < (t1 - t0) * chunks; idx += blockDim.x) {
      const long long j = idx / chunks;
      const int d = static_cast<int>(idx % chunks) * 8;
      mma::copy8(ks + j * ld + d, key(b, h, t0 + j) + d);
      mma::copy8(vs + j * ld + d, value(b, h, t0 + j) + d);
    }
  }

  // Threads walk head_dim fastest: coalesced rows of K and V in global memory.
  __device__ void load(long long b, long long h, long long t0, long long t1, float* kt, int ldk, float* v_s) const {
    const T* kb = k + b * sb + h * sh;
    const T* vb = v + b * sb + h * sh;
    for (long long idx = threadIdx.x; idx < (t1 - t0) * D; idx += blockDim.x) {
      const long long j = idx / D;
      const int d = static_cast<int>(idx % D);
      kt[d * ldk + j] = to_float(kb[(t0 + j) * st + d]);
      v_s[j * D + d] = to_float(vb[(t0 + j) * st + d]);
    }
  }
};

template <typename T>
cudaError_t dense_typed(const AttentionArgs& a, const DenseKV& kv, void* workspace, cudaStream_t stream) {
  const DenseCached<T> cached{static_cast<const T*>(kv.k), static_cast<const T*>(kv.v), kv.sb, kv.sh, kv.st,
                              static_cast<int>(a.head_dim)};
  return run_attention<T>(a, cached, workspace, stream);
}

}  // namespace

size_t attention_workspace_bytes(const AttentionArgs& a) { return plan_attention(a).workspace_bytes; }

bool dense_attention_scores(const AttentionArgs& a, const DenseKV& kv, DType dtype) {
  const int64_t strides[3] = {kv.sb, kv.sh, kv.st};
  return a.scores != nullptr && fast_paths_enabled() &&
         decode::eligible(a, decode::rows_aligned(a, dtype_size(dtype), kv.k, kv.v, strides));
}

cudaError_t dense_attention(const AttentionArgs& a, const DenseKV& kv, DType dtype, void* workspace,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return dense_typed<float>(a, kv, workspace, stream);
    case DType::Float16: return dense_typed<__half>(a, kv, workspace, stream);
    case DType::BFloat16: return dense_typed<__nv_bfloat16>(a, kv, workspace, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace effx
