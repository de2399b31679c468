// effx SIMT emulator: the WMMA API. Every lane holds the whole tile (a real warp spreads it
// over its lanes in an unspecified way), so each lane computes the full product: slow but the
// same result, with products of fp16/bf16 values exact in fp32 as on tensor cores. Each call
// starts with a warp barrier, as the collective it is: no lane stores a tile before every lane
// has loaded what it read (a read-modify-write of a tile in shared memory would otherwise add
// up once per lane). Loads and stores check the pointer alignment (256 bits) and ldm (a
// multiple of 16 bytes) the hardware requires.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  float v[rows * cols];
};

namespace detail {
inline float value(float x) { return x; }
inline float value(__half x) { return __half2float(x); }
inline float value(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
void check(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
    std::fprintf(stderr, "simt: wmma::%s needs a 256-bit aligned pointer and ldm a multiple of 16 bytes\n", what);
    std::abort();
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float x) {
  __syncwarp();
  for (float& e : f.v) e = x;
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  __syncwarp();
  detail::check(p, ldm, "load_matrix_sync");
  const bool row = std::is_same<L, row_major>::value;
  for (int i = 0; i < F::rows; ++i)
    for (int j = 0; j < F::cols; ++j) f.v[i * F::cols + j] = detail::value(row ? p[i * ldm + j] : p[i + j * ldm]);
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const float* p, unsigned ldm, layout_t layout) {
  __syncwarp();
  detail::check(p, ldm, "load_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) f.v[i * N + j] = layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm];
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  __syncwarp();
  detail::check(p, ldm, "store_matrix_sync");
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.v[i * N + j];
}

template <int M, int N, int K, typename T, typename S, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, T>& d, const fragment<matrix_a, M, N, K, S, LA>& a,
              const fragment<matrix_b, M, N, K, S, LB>& b, const fragment<accumulator, M, N, K, T>& c) {
  __syncwarp();
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float x = c.v[i * N + j];
      for (int k = 0; k < K; ++k) x += a.v[i * K + k] * b.v[k * N + j];
      out[i * N + j] = x;
    }
  for (int e = 0; e < M * N; ++e) d.v[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
