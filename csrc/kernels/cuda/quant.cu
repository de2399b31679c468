// effx family: group-wise asymmetric quantization, CUDA kernels (layout in
// include/effx/quant.h). One thread owns a unit of lcm(group_size, codes per word) values,
// i.e. whole groups and whole output words, so packing needs no atomics or shuffles.
#include <numeric>

#include "effx/quant_cuda.h"
#include "quant_group.cuh"

namespace effx {
namespace cuda {
namespace {

constexpr int kBlock = 256;

template <typename T, int BITS>
__global__ void quantize_kernel(QuantShape s, long long unit, long long units_per_row,
                                const T* __restrict__ x, int32_t* __restrict__ codes,
                                T* __restrict__ scale, T* __restrict__ zero) {
  constexpr int kPerWord = 32 / BITS;
  const long long total = units_per_row * s.rows;
  const long long words_per_row = (s.cols + kPerWord - 1) / kPerWord;
  const long long groups_per_row = s.cols / s.group_size;
  for (long long u = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; u < total;
       u += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = u / units_per_row;
    const long long begin = (u % units_per_row) * unit;
    const long long end = begin + unit < s.cols ? begin + unit : s.cols;
    const T* xr = x + row * s.x_row_stride;
    int32_t* out = codes + row * words_per_row + begin / kPerWord;
    uint32_t acc = 0;
    int slot = 0;
    for (long long g0 = begin; g0 < end; g0 += s.group_size) {
      const long long gi = row * groups_per_row + g0 / s.group_size;
      const T* xg = xr + g0;
      const GroupCoder c = group_params<T, BITS>([xg](int i) { return to_float(xg[i]); }, s.group_size, scale + gi, zero + gi);
      // Second read of the group hits L1: it was just loaded by this thread.
      for (int i = 0; i < s.group_size; ++i) {
        acc |= encode<BITS>(to_float(xr[g0 + i]), c) << (BITS * slot);
        if (++slot == kPerWord) {
          *out++ = static_cast<int32_t>(acc);
          acc = 0;
          slot = 0;
        }
      }
    }
    if (slot != 0) *out = static_cast<int32_t>(acc);
  }
}

template <typename P, typename O, int BITS>
__global__ void dequantize_kernel(QuantShape s, const int32_t* __restrict__ codes,
                                  const P* __restrict__ scale, const P* __restrict__ zero,
                                  O* __restrict__ out) {
  constexpr int kPerWord = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const long long words_per_row = (s.cols + kPerWord - 1) / kPerWord;
  const long long groups_per_row = s.cols / s.group_size;
  const long long total = words_per_row * s.rows;
  for (long long w = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; w < total;
       w += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = w / words_per_row;
    const long long first = (w % words_per_row) * kPerWord;
    const uint32_t word = static_cast<uint32_t>(codes[w]);
    O* orow = out + row * s.cols;
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) {
      const long long col = first + j;
      if (col < s.cols) {
        const long long gi = row * groups_per_row + col / s.group_size;
        const float c = static_cast<float>((word >> (BITS * j)) & kMask);
        orow[col] = from_float<O>(c * to_float(scale[gi]) + to_float(zero[gi]));
      }
    }
  }
}

template <typename T>
cudaError_t quantize_typed(const QuantShape& s, const void* x, int32_t* codes, void* scale,
                           void* zero, cudaStream_t stream) {
  const long long unit = std::lcm<long long>(s.group_size, quant_codes_per_word(s.bits));
  const long long units_per_row = (s.cols + unit - 1) / unit;
  const unsigned int grid = grid_for(units_per_row * s.rows, kBlock);
  const T* xt = static_cast<const T*>(x);
  T* st = static_cast<T*>(scale);
  T* zt = static_cast<T*>(zero);
  switch (s.bits) {
    case 2:
      quantize_kernel<T, 2><<<grid, kBlock, 0, stream>>>(s, unit, units_per_row, xt, codes, st, zt);
      break;
    case 4:
      quantize_kernel<T, 4><<<grid, kBlock, 0, stream>>>(s, unit, units_per_row, xt, codes, st, zt);
      break;
    case 8:
      quantize_kernel<T, 8><<<grid, kBlock, 0, stream>>>(s, unit, units_per_row, xt, codes, st, zt);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename P, typename O>
cudaError_t dequantize_typed(const QuantShape& s, const int32_t* codes, const void* scale,
                             const void* zero, void* out, cudaStream_t stream) {
  const unsigned int grid = grid_for(quant_words_per_row(s.cols, s.bits) * s.rows, kBlock);
  const P* st = static_cast<const P*>(scale);
  const P* zt = static_cast<const P*>(zero);
  O* ot = static_cast<O*>(out);
  switch (s.bits) {
    case 2: dequantize_kernel<P, O, 2><<<grid, kBlock, 0, stream>>>(s, codes, st, zt, ot); break;
    case 4: dequantize_kernel<P, O, 4><<<grid, kBlock, 0, stream>>>(s, codes, st, zt, ot); break;
    case 8: dequantize_kernel<P, O, 8><<<grid, kBlock, 0, stream>>>(s, codes, st, zt, ot); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename P>
cudaError_t dequantize_out(const QuantShape& s, const int32_t* codes, const void* scale,
                           const void* zero, DType out_dtype, void* out, cudaStream_t stream) {
  switch (out_dtype) {
    case DType::Float32: return dequantize_typed<P, float>(s, codes, scale, zero, out, stream);
    case DType::Float16: return dequantize_typed<P, __half>(s, codes, scale, zero, out, stream);
    case DType::BFloat16:
      return dequantize_typed<P, __nv_bfloat16>(s, codes, scale, zero, out, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t quantize(const QuantShape& s, DType dtype, const void* x, int32_t* codes,
                     void* scale, void* zero, cudaStream_t stream) {
  if (s.rows == 0 || s.cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return quantize_typed<float>(s, x, codes, scale, zero, stream);
    case DType::Float16: return quantize_typed<__half>(s, x, codes, scale, zero, stream);
    case DType::BFloat16: return quantize_typed<__nv_bfloat16>(s, x, codes, scale, zero, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

cudaError_t dequantize(const QuantShape& s, const int32_t* codes, DType param_dtype,
                       const void* scale, const void* zero, DType out_dtype, void* out,
                       cudaStream_t stream) {
  if (s.rows == 0 || s.cols == 0) return cudaSuccess;
  switch (param_dtype) {
    case DType::Float32:
      return dequantize_out<float>(s, codes, scale, zero, out_dtype, out, stream);
    case DType::Float16:
      return dequantize_out<__half>(s, codes, scale, zero, out_dtype, out, stream);
    case DType::BFloat16:
      return dequantize_out<__nv_bfloat16>(s, codes, scale, zero, out_dtype, out, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace effx
