// effx: CUDA block GEMM shared by the structured-matrix families (Monarch, Pixelfly).
// A batch of independent C(g, m, n) = sum_k A(g, m, k) B(g, k, n), every operand addressed by
// strides, so the Monarch permutations P1/P2 and the transposes of the backward are folded
// into the loads and stores instead of being materialized. fp16/bf16 operands run on tensor
// cores (WMMA 16x16x16, fp32 accumulate); fp32 runs on the FMA pipes in fp32 for exactness.
// Tiles of 64 x 64 x 32 per 256-thread block; each operand tile is staged in shared memory
// with loads ordered along whichever of its dims has unit stride, so they coalesce.
#pragma once

#include <mma.h>

#include <cstdint>

#include "dtype.cuh"

namespace effx {
namespace cuda {
namespace block_gemm {

struct GemmView {
  long long batch, M, N, K;
  long long a_g, a_m, a_k;  // A(g, m, k)
  long long b_g, b_k, b_n;  // B(g, k, n)
  long long c_g, c_m, c_n;  // C(g, m, n)
};

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 256;

// Stage a kBM x kBK tile of A into As[m][k] and a kBK x kBN tile of B into Bs[k][n], as S,
// zero outside the matrix. Threads walk the unit-stride dim fastest.
template <typename S, int LDA, int LDB, typename TA, typename TB>
__device__ __forceinline__ void stage_tiles(const GemmView& v, const TA* A, const TB* B,
                                            long long m0, long long n0, long long k0, S* As,
                                            S* Bs) {
  const bool a_k_fast = v.a_k == 1;
  for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
    const int m = a_k_fast ? e / kBK : e % kBM;
    const int k = a_k_fast ? e % kBK : e / kBM;
    const long long gm = m0 + m, gk = k0 + k;
    const float val = (gm < v.M && gk < v.K) ? to_float(A[gm * v.a_m + gk * v.a_k]) : 0.0f;
    As[m * LDA + k] = from_float<S>(val);
  }
  const bool b_n_fast = v.b_n == 1;
  for (int e = threadIdx.x; e < kBK * kBN; e += kThreads) {
    const int n = b_n_fast ? e % kBN : e / kBK;
    const int k = b_n_fast ? e / kBN : e % kBK;
    const long long gn = n0 + n, gk = k0 + k;
    const float val = (gn < v.N && gk < v.K) ? to_float(B[gk * v.b_k + gn * v.b_n]) : 0.0f;
    Bs[k * LDB + n] = from_float<S>(val);
  }
}

// Write the fp32 tile Cs[m][n] to C, ordered along C's unit-stride dim.
template <int LDC, typename TC>
__device__ __forceinline__ void store_tile(const GemmView& v, const float* Cs, TC* C,
                                          long long m0, long long n0) {
  const bool n_fast = v.c_n == 1 || v.c_m != 1;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int m = n_fast ? e / kBN : e % kBM;
    const int n = n_fast ? e % kBN : e / kBM;
    const long long gm = m0 + m, gn = n0 + n;
    if (gm < v.M && gn < v.N) C[gm * v.c_m + gn * v.c_n] = from_float<TC>(Cs[m * LDC + n]);
  }
}

// Tensor-core path: S is __half or __nv_bfloat16. 8 warps, each owning a 16 x 32 strip.
template <typename S, typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(kThreads)
    gemm_wmma_kernel(GemmView v, const TA* __restrict__ A, const TB* __restrict__ B,
                     TC* __restrict__ C) {
  using namespace nvcuda;
  constexpr int LDA = kBK + 8, LDB = kBN + 8, LDC = kBN + 4;  // ldm multiples of 16 bytes
  __shared__ __align__(32) S As[kBM * LDA];
  __shared__ __align__(32) S Bs[kBK * LDB];
  __shared__ __align__(32) float Cs[kBM * LDC];
  const long long g = blockIdx.z;
  A += g * v.a_g;
  B += g * v.b_g;
  C += g * v.c_g;
  const long long m0 = static_cast<long long>(blockIdx.x) * kBM;
  const long long n0 = static_cast<long long>(blockIdx.y) * kBN;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 16, wn = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  for (long long k0 = 0; k0 < v.K; k0 += kBK) {
    stage_tiles<S, LDA, LDB>(v, A, B, m0, n0, k0, As, Bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, As + wm * LDA + kk, LDA);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, S, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, Bs + kk * LDB + wn + 16 * f, LDB);
        wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(Cs + wm * LDC + wn, acc[0], LDC, wmma::mem_row_major);
  wmma::store_matrix_sync(Cs + wm * LDC + wn + 16, acc[1], LDC, wmma::mem_row_major);
  __syncthreads();
  store_tile<LDC>(v, Cs, C, m0, n0);
}

// fp32 path: each thread accumulates a 4 x 4 sub-tile (rows ty + 16 i, cols tx + 16 j, so a
// warp reads shared memory without bank conflicts).
template <typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(kThreads)
    gemm_fma_kernel(GemmView v, const TA* __restrict__ A, const TB* __restrict__ B,
                    TC* __restrict__ C) {
  constexpr int LDA = kBK + 1, LDB = kBN + 4, LDC = kBN + 4;
  __shared__ float As[kBM * LDA];
  __shared__ float Bs[kBK * LDB];
  __shared__ float Cs[kBM * LDC];
  const long long g = blockIdx.z;
  A += g * v.a_g;
  B += g * v.b_g;
  C += g * v.c_g;
  const long long m0 = static_cast<long long>(blockIdx.x) * kBM;
  const long long n0 = static_cast<long long>(blockIdx.y) * kBN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (long long k0 = 0; k0 < v.K; k0 += kBK) {
    stage_tiles<float, LDA, LDB>(v, A, B, m0, n0, k0, As, Bs);
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[(ty + 16 * i) * LDA + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk * LDB + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * LDC + tx + 16 * j] = acc[i][j];
  __syncthreads();
  store_tile<LDC>(v, Cs, C, m0, n0);
}

// Launch on `stream`; S is the tensor-core operand type, or float for the fp32 path.
template <typename S, typename TA, typename TB, typename TC>
cudaError_t gemm(const GemmView& v, const TA* A, const TB* B, TC* C, cudaStream_t stream) {
  if (v.batch == 0 || v.M == 0 || v.N == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((v.M + kBM - 1) / kBM),
                  static_cast<unsigned>((v.N + kBN - 1) / kBN), static_cast<unsigned>(v.batch));
  if constexpr (std::is_same<S, float>::value) {
    gemm_fma_kernel<TA, TB, TC><<<grid, kThreads, 0, stream>>>(v, A, B, C);
  } else {
    gemm_wmma_kernel<S, TA, TB, TC><<<grid, kThreads, 0, stream>>>(v, A, B, C);
  }
  return cudaGetLastError();
}

}  // namespace block_gemm
}  // namespace cuda
}  // namespace effx
