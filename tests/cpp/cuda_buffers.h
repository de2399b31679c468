// effx C++ tests of CUDA kernels: device copies of host vectors, for the GPU and the SIMT
// emulator alike (there, device memory is host memory).
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include <cstdio>
#include <cstdlib>

#include "check.h"

#define CUDA_OK(expr) EFFX_EXPECT((expr) == cudaSuccess, "%s", cudaGetErrorString(cudaGetLastError()))

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&d), h.size() * sizeof(T) + 16));
  if (!h.empty()) CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  if (n) CUDA_OK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Exits 77 (ctest: skipped) when there is no device to run on.
inline void require_device(const char* test) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("%s: skipped, no CUDA device\n", test);
    std::exit(77);
  }
}
