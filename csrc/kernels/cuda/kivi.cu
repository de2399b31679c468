// effx family: KIVI 2/4-bit KV cache, CUDA kernels: attention over quantized + residual + new
// tokens (decode on the codes in kivi_decode.cuh, more rows through the shared engine), and
// the append that applies the residual rule in closed form (layout in include/effx/kivi.h).
#include <algorithm>

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

// The residual rule in closed form (include/effx/kivi.h): appending tn tokens to a row that
// holds n quantizes the values [vq, vq') and the key blocks [kq, kq'), with n' = n + tn,
// kq' = kq + (n' - kq) / R * R and vq' = max(vq, n' - R). Every group depends only on its own
// tokens, so all of them are quantized at once, each token read from the old residual
// (t < n) or from the new tokens: one thread per value group of a token or per key group of
// a channel. The sequential rule gives the same groups, one token at a time.
struct Leaving {
  long long n, tn, kq, kq1, vq, vq1;
};

__device__ __forceinline__ Leaving leaving(const KiviStorage& s, long long b, long long new_len,
                                           const int64_t* new_lengths) {
  Leaving x;
  x.n = s.state[b * 3];
  x.kq = s.state[b * 3 + 1];
  x.vq = s.state[b * 3 + 2];
  x.tn = new_lengths ? new_lengths[b] : new_len;
  const long long n1 = x.n + x.tn;
  x.kq1 = x.kq + (n1 - x.kq) / s.residual * s.residual;
  x.vq1 = x.vq > n1 - s.residual ? x.vq : n1 - s.residual;
  return x;
}

template <typename T, int BITS>
__global__ void quantize_leaving_kernel(KiviStorage s, KiviDims k, Strided kn, Strided vn, long long new_len,
                                        const int64_t* new_lengths) {
  const long long bh = blockIdx.x, b = bh / k.H;
  const Leaving x = leaving(s, b, new_len, new_lengths);
  const T* k_res = static_cast<const T*>(s.k_res) + bh * k.D * k.R;
  const T* v_res = static_cast<const T*>(s.v_res) + bh * k.R * k.D;
  const T* kb = static_cast<const T*>(kn.data) + b * kn.sb + (bh % k.H) * kn.sh;
  const T* vb = static_cast<const T*>(vn.data) + b * vn.sb + (bh % k.H) * vn.sh;
  const long long v_items = (x.vq1 - x.vq) * k.v_groups, k_items = k.D * ((x.kq1 - x.kq) / k.G);
  const int G = static_cast<int>(k.G);
  for (long long item = blockIdx.y * static_cast<long long>(blockDim.x) + threadIdx.x; item < v_items + k_items;
       item += static_cast<long long>(gridDim.y) * blockDim.x) {
    if (item < v_items) {  // value group g of token t: G channels of one row
      const long long t = x.vq + item / k.v_groups, g = item % k.v_groups;
      const T* row = (t < x.n ? v_res + (t % k.R) * k.D : vb + (t - x.n) * vn.st) + g * k.G;
      quantize_values<T, BITS>([row](int i) { return to_float(row[i]); }, G,
                               s.v_codes + (bh * k.C + t) * k.v_words + g * k.G * BITS / 32,
                               static_cast<T*>(s.v_scale) + (bh * k.C + t) * k.v_groups + g,
                               static_cast<T*>(s.v_zero) + (bh * k.C + t) * k.v_groups + g);
    } else {  // key group of channel d: G tokens from t0
      const long long i = item - v_items, per_channel = (x.kq1 - x.kq) / k.G;
      const long long d = i / per_channel, t0 = x.kq + (i % per_channel) * k.G, n = x.n, R = k.R, st = kn.st;
      const T* res = k_res + d * k.R;
      const T* fresh = kb + d;
      quantize_values<T, BITS>(
          [=](int j) {
            const long long t = t0 + j;
            return to_float(t < n ? res[t % R] : fresh[(t - n) * st]);
          },
          G, s.k_codes + (bh * k.D + d) * k.k_words + t0 * BITS / 32,
          static_cast<T*>(s.k_scale) + (bh * k.D + d) * k.k_groups + t0 / k.G,
          static_cast<T*>(s.k_zero) + (bh * k.D + d) * k.k_groups + t0 / k.G);
    }
  }
}

// Then the new tokens that stay go to the residual rings (slot t % R): after the quantization,
// since a new token may take the slot of an old one that was just quantized.
template <typename T>
__global__ void fill_residual_kernel(KiviStorage s, KiviDims k, Strided kn, Strided vn, long long new_len,
                                     const int64_t* new_lengths) {
  const long long bh = blockIdx.x, b = bh / k.H;
  const Leaving x = leaving(s, b, new_len, new_lengths);
  T* k_res = static_cast<T*>(s.k_res) + bh * k.D * k.R;
  T* v_res = static_cast<T*>(s.v_res) + bh * k.R * k.D;
  const T* kb = static_cast<const T*>(kn.data) + b * kn.sb + (bh % k.H) * kn.sh;
  const T* vb = static_cast<const T*>(vn.data) + b * vn.sb + (bh % k.H) * vn.sh;
  const long long n1 = x.n + x.tn;
  const long long k0 = x.kq1 > x.n ? x.kq1 : x.n, v0 = x.vq1 > x.n ? x.vq1 : x.n;
  const long long k_items = (n1 - k0) * k.D, v_items = (n1 - v0) * k.D;
  for (long long item = blockIdx.y * static_cast<long long>(blockDim.x) + threadIdx.x; item < k_items + v_items;
       item += static_cast<long long>(gridDim.y) * blockDim.x) {
    if (item < k_items) {
      const long long t = k0 + item / k.D, d = item % k.D;
      k_res[d * k.R + t % k.R] = kb[(t - x.n) * kn.st + d];
    } else {
      const long long t = v0 + (item - k_items) / k.D, d = (item - k_items) % k.D;
      v_res[(t % k.R) * k.D + d] = vb[(t - x.n) * vn.st + d];
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
  const dim3 grid = attention_grid(a, ROWS, p.splits);
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
  const KiviDims k = kivi_dims(s);
  // Threads for the most a row can have to do: at most new_len value tokens and new_len + R
  // key tokens leave the residual; at most new_len tokens of each enter it.
  const long long quantize = new_len * k.v_groups + k.D * ((new_len + k.R) / k.G), fill = 2 * new_len * k.D;
  const long long most = std::max(quantize, fill);
  // (batch row, head) on x, which allows 2^31 - 1 of them; a grid-stride loop on y.
  const dim3 grid(static_cast<unsigned>(s.batch * s.heads),
                  static_cast<unsigned>(std::min<long long>((most + 255) / 256, 4096)));
  if (s.bits == 2) {
    quantize_leaving_kernel<T, 2><<<grid, 256, 0, stream>>>(s, k, kn, vn, new_len, new_lengths);
  } else {
    quantize_leaving_kernel<T, 4><<<grid, 256, 0, stream>>>(s, k, kn, vn, new_len, new_lengths);
  }
  fill_residual_kernel<T><<<grid, 256, 0, stream>>>(s, k, kn, vn, new_len, new_lengths);
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
