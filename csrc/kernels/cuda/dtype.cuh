// effx: device-side fp32 conversions for the storage dtypes of include/effx/dtype.h, and launch
// sizing helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace effx {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Smallest T >= x (for the quantization scale; see from_float_up in include/effx/dtype.h).
template <typename T> __device__ __forceinline__ T from_float_up(float x);
template <> __device__ __forceinline__ float from_float_up<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float_up<__half>(float x) {
  return __float2half_ru(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float_up<__nv_bfloat16>(float x) {
  return __float2bfloat16_ru(x);
}

// The multiprocessors of the current GPU, read once per process: a decode step asks per layer,
// and a workspace size and the launch that uses it must agree (effx assumes the process's GPUs
// are of one kind).
inline int multiprocessors() {
  static const int sms = [] {
    int device = 0, n = 132;
    if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    return n;
  }();
  return sms;
}

// The most dynamic shared memory a block may opt into on the current GPU (227 KB on sm_90,
// 163 KB on sm_80, 99 KB on sm_86/89), read once per process like multiprocessors().
inline size_t smem_optin() {
  static const size_t bytes = [] {
    int device = 0, n = 48 * 1024;
    if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return static_cast<size_t>(n);
  }();
  return bytes;
}

// Grid size for a grid-stride loop over `work` items: enough blocks to fill the device
// several times over, capped so the launch stays legal.
inline unsigned int grid_for(long long work, int block) {
  const long long blocks = (work + block - 1) / block;
  return static_cast<unsigned int>(blocks < 65535LL * 32 ? (blocks > 0 ? blocks : 1) : 65535LL * 32);
}

}  // namespace cuda
}  // namespace effx
