// effx family: KIVI 2/4-bit KV cache, CUDA kernels: attention over quantized + residual + new
// tokens (decode on the codes in kivi_decode.cuh, more rows through the shared engine), and
// the append that applies the residual rule (layout in include/effx/kivi.h).
#include "attention_engine.cuh"
#include "effx/kivi_cuda.h"
#include "kivi_decode.cuh"
#include "quant_group.cuh"

namespace effx {
namespace cuda {
namespace {

struct KiviDims {
  long long H, D, C, R, G, k_words, k_groups, v_words, v_groups;
};

KiviDims kivi_dims(const KiviStorage& s) {
  return KiviDims{s.heads, s.head_dim, s.capacity, s.residual, s.group_size, s.capacity * s.bits / 32,
                  s.capacity / s.group_size, s.head_dim * s.bits / 32, s.head_dim / s.group_size};
}

template <typename T, int BITS>
struct KiviCached {
  KiviStorage s;
  KiviDims k;

  __device__ __forceinline__ static float code(const int32_t* words, long long j) {
    constexpr int kPerWord = 32 / BITS;
    return static_cast<float>((static_cast<uint32_t>(words[j / kPerWord]) >> (BITS * (j % kPerWord))) &
                              ((1u << BITS) - 1u));
  }

  // Cached key / value (t, d) of row bh, dequantized where it is quantized.
  __device__ __forceinline__ float key_at(long long b, long long bh, long long t, long long d) const {
    if (t < s.state[b * 3 + 1]) {
      const long long g = (bh * k.D + d) * k.k_groups + t / k.G;
      return code(s.k_codes + (bh * k.D + d) * k.k_words, t) * to_float(static_cast<const T*>(s.k_scale)[g]) +
             to_float(static_cast<const T*>(s.k_zero)[g]);
    }
    return to_float(static_cast<const T*>(s.k_res)[(bh * k.D + d) * k.R + t % k.R]);
  }
  __device__ __forceinline__ float value_at(long long b, long long bh, long long t, long long d) const {
    if (t < s.state[b * 3 + 2]) {
      const long long g = (bh * k.C + t) * k.v_groups + d / k.G;
      return code(s.v_codes + (bh * k.C + t) * k.v_words, d) * to_float(static_cast<const T*>(s.v_scale)[g]) +
             to_float(static_cast<const T*>(s.v_zero)[g]);
    }
    return to_float(static_cast<const T*>(s.v_res)[(bh * k.R + t % k.R) * k.D + d]);
  }

  // For the fp32 engine. Keys walk tokens fastest (a warp reads the same few code words, the
  // codes being channel-major), values channels fastest.
  __device__ void load(long long b, long long h, long long t0, long long t1, float* kt, int ldk, float* v) const {
    const long long bh = b * k.H + h, bt = t1 - t0;
    for (long long idx = threadIdx.x; idx < bt * k.D; idx += blockDim.x) {
      const long long j = idx % bt, d = idx / bt;
      kt[d * ldk + j] = key_at(b, bh, t0 + j, d);
    }
    for (long long idx = threadIdx.x; idx < bt * k.D; idx += blockDim.x) {
      const long long j = idx / k.D, d = idx % k.D;
      v[j * k.D + d] = value_at(b, bh, t0 + j, d);
    }
  }

  // For the tensor-core path: dequantized into the storage dtype, token-major.
  bool tiles_aligned(const AttentionArgs& a) const { return decode::new_rows_aligned(a, sizeof(T)); }
  __device__ void stage_tile(long long b, long long h, long long t0, long long t1, T* ks, T* vs, int ld) const {
    const long long bh = b * k.H + h, bt = t1 - t0;
    for (long long idx = threadIdx.x; idx < bt * k.D; idx += blockDim.x) {
      const long long j = idx % bt, d = idx / bt;
      ks[j * ld + d] = from_float<T>(key_at(b, bh, t0 + j, d));
    }
    for (long long idx = threadIdx.x; idx < bt * k.D; idx += blockDim.x) {
      const long long j = idx / k.D, d = idx % k.D;
      vs[j * ld + d] = from_float<T>(value_at(b, bh, t0 + j, d));
    }
  }
};

// One block per (batch row, kv-head) walks the new tokens in order, as the rule is sequential.
template <typename T, int BITS>
__global__ void append_kernel(KiviStorage s, KiviDims k, Strided kn, Strided vn, long long new_len,
                              const int64_t* new_lengths) {
  const long long bh = blockIdx.x, b = bh / k.H, h = bh % k.H;
  const long long n = s.state[b * 3];
  long long kq = s.state[b * 3 + 1], vq = s.state[b * 3 + 2];
  const long long tn = new_lengths ? new_lengths[b] : new_len;
  T* k_res = static_cast<T*>(s.k_res) + bh * k.D * k.R;
  T* v_res = static_cast<T*>(s.v_res) + bh * k.R * k.D;
  int32_t* k_codes = s.k_codes + bh * k.D * k.k_words;
  T* k_scale = static_cast<T*>(s.k_scale) + bh * k.D * k.k_groups;
  T* k_zero = static_cast<T*>(s.k_zero) + bh * k.D * k.k_groups;
  int32_t* v_codes = s.v_codes + bh * k.C * k.v_words;
  T* v_scale = static_cast<T*>(s.v_scale) + bh * k.C * k.v_groups;
  T* v_zero = static_cast<T*>(s.v_zero) + bh * k.C * k.v_groups;
  const T* kb = static_cast<const T*>(kn.data) + b * kn.sb + h * kn.sh;
  const T* vb = static_cast<const T*>(vn.data) + b * vn.sb + h * vn.sh;
  for (long long i = 0; i < tn; ++i) {
    const long long t = n + i, slot = t % k.R;
    if (t - vq == k.R) {  // R values held: the oldest (in this token's slot) leaves the window
      for (long long g = threadIdx.x; g < k.v_groups; g += blockDim.x) {
        quantize_group<T, BITS>(v_res + slot * k.D + g * k.G, static_cast<int>(k.G),
                                v_codes + vq * k.v_words + g * k.G * BITS / 32, v_scale + vq * k.v_groups + g,
                                v_zero + vq * k.v_groups + g);
      }
      ++vq;
      __syncthreads();
    }
    for (long long d = threadIdx.x; d < k.D; d += blockDim.x) {
      v_res[slot * k.D + d] = vb[i * vn.st + d];
      k_res[d * k.R + slot] = kb[i * kn.st + d];
    }
    __syncthreads();
    if (t + 1 - kq == k.R) {  // a whole block of R keys: per channel, in groups of G tokens
      const long long per_channel = k.R / k.G;
      for (long long idx = threadIdx.x; idx < k.D * per_channel; idx += blockDim.x) {
        const long long d = idx / per_channel, g = idx % per_channel;
        quantize_group<T, BITS>(k_res + d * k.R + g * k.G, static_cast<int>(k.G),
                                k_codes + d * k.k_words + (kq + g * k.G) * BITS / 32,
                                k_scale + d * k.k_groups + kq / k.G + g, k_zero + d * k.k_groups + kq / k.G + g);
      }
      kq += k.R;
      __syncthreads();
    }
  }
}

// The rule in closed form (see include/effx/kivi.h), applied once every head is done.
__global__ void advance_state_kernel(KiviStorage s, long long new_len, const int64_t* new_lengths) {
  const long long b = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (b >= s.batch) return;
  const long long n = s.state[b * 3] + (new_lengths ? new_lengths[b] : new_len);
  const long long kq = s.state[b * 3 + 1], vq = s.state[b * 3 + 2], R = s.residual;
  s.state[b * 3] = n;
  s.state[b * 3 + 1] = kq + (n - kq) / R * R;
  s.state[b * 3 + 2] = vq > n - R ? vq : n - R;
}

template <typename T, int BITS, int ROWS, int D>
cudaError_t run_codes_with(const AttentionArgs& a, const KiviStorage& s, void* workspace, cudaStream_t stream) {
  auto kernel = kivi_decode::kivi_decode_kernel<T, BITS, ROWS, D>;
  const kivi_decode::Plan p =
      kivi_decode::plan(a, BITS, cached_slots<kivi_decode::kivi_decode_kernel<T, BITS, ROWS, D>>(kivi_decode::kThreads));
  const dim3 grid(p.splits, static_cast<unsigned>(a.batch * a.kv_heads), p.row_chunks);
  float* partial = static_cast<float*>(workspace);
  kernel<<<grid, kivi_decode::kThreads, 0, stream>>>(a, s, p.tokens_per_split, partial);
  if (p.splits > 1) {
    combine_kernel<T><<<static_cast<unsigned>(a.batch * a.q_heads), 128, 0, stream>>>(a, p.splits, partial);
  }
  return cudaGetLastError();
}

template <typename T, int BITS, int ROWS>
cudaError_t run_codes_rows(const AttentionArgs& a, const KiviStorage& s, void* workspace, cudaStream_t stream) {
  return a.head_dim == 64 ? run_codes_with<T, BITS, ROWS, 64>(a, s, workspace, stream)
                          : run_codes_with<T, BITS, ROWS, 128>(a, s, workspace, stream);
}

// The workspace (attention_workspace_bytes) covers these splits: they are never more than the
// dense decode path's for the same call, whose splits are no longer.
template <typename T, int BITS>
cudaError_t run_decode_codes(const AttentionArgs& a, const KiviStorage& s, void* workspace, cudaStream_t stream) {
  switch (decode::rows_for(a)) {
    case 1: return run_codes_rows<T, BITS, 1>(a, s, workspace, stream);
    case 2: return run_codes_rows<T, BITS, 2>(a, s, workspace, stream);
    case 4: return run_codes_rows<T, BITS, 4>(a, s, workspace, stream);
    default: return run_codes_rows<T, BITS, 8>(a, s, workspace, stream);
  }
}

template <typename T>
cudaError_t attention_typed(const AttentionArgs& a, const KiviStorage& s, void* workspace, cudaStream_t stream) {
  if (fast_paths_enabled() && kivi_decode::eligible(a, s)) {
    return s.bits == 2 ? run_decode_codes<T, 2>(a, s, workspace, stream) : run_decode_codes<T, 4>(a, s, workspace, stream);
  }
  if (s.bits == 2) return run_attention<T>(a, KiviCached<T, 2>{s, kivi_dims(s)}, workspace, stream);
  return run_attention<T>(a, KiviCached<T, 4>{s, kivi_dims(s)}, workspace, stream);
}

template <typename T>
cudaError_t append_typed(const KiviStorage& s, const Strided& kn, const Strided& vn, long long new_len,
                         const int64_t* new_lengths, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(s.batch * s.heads);
  if (s.bits == 2) {
    append_kernel<T, 2><<<blocks, 128, 0, stream>>>(s, kivi_dims(s), kn, vn, new_len, new_lengths);
  } else {
    append_kernel<T, 4><<<blocks, 128, 0, stream>>>(s, kivi_dims(s), kn, vn, new_len, new_lengths);
  }
  advance_state_kernel<<<static_cast<unsigned>((s.batch + 127) / 128), 128, 0, stream>>>(s, new_len, new_lengths);
  return cudaGetLastError();
}

}  // namespace

cudaError_t kivi_attention(const AttentionArgs& a, const KiviStorage& s, DType dtype, void* workspace,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return attention_typed<float>(a, s, workspace, stream);
    case DType::Float16: return attention_typed<__half>(a, s, workspace, stream);
    case DType::BFloat16: return attention_typed<__nv_bfloat16>(a, s, workspace, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

cudaError_t kivi_append(const KiviStorage& s, DType dtype, const Strided& k_new, const Strided& v_new,
                        int64_t new_len, const int64_t* new_lengths, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return append_typed<float>(s, k_new, v_new, new_len, new_lengths, stream);
    case DType::Float16: return append_typed<__half>(s, k_new, v_new, new_len, new_lengths, stream);
    case DType::BFloat16: return append_typed<__nv_bfloat16>(s, k_new, v_new, new_len, new_lengths, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace effx
