// effx: CUDA block GEMM shared by the structured-matrix families (Monarch, Pixelfly).
// A batch of independent C(g, m, n) = sum_k A(g, m, k) B(g, k, n), every operand addressed by
// strides (and C's columns optionally split, so a permutation is folded into the store).
// fp16/bf16 operands run on tensor cores (WMMA 16x16x16, fp32 accumulate): 128 x 128 x 32
// tiles when the grid still fills the GPU twice over, else 64 x 64 x 32; each operand is
// staged in shared memory in the orientation of its unit-stride dim (a row- or column-major
// fragment reads it), with 16-byte global loads where the strides allow, and the next tile's
// loads are in flight while the tensor cores work on this one. fp32 runs on the FMA pipes in
// fp32 for exactness, 64 x 64 x 32 tiles with element loads.
#pragma once

#include <mma.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "dtype.cuh"

namespace effx {
namespace cuda {
namespace block_gemm {

struct GemmView {
  long long batch, M, N, K;
  long long a_g, a_m, a_k;  // A(g, m, k)
  long long b_g, b_k, b_n;  // B(g, k, n)
  long long c_g, c_m, c_n;  // C(g, m, n)
  // With c_split > 0, column n of C lies at (n % c_split) * c_n + (n / c_split) * c_n_hi.
  long long c_split = 0, c_n_hi = 0;
};

__host__ __device__ __forceinline__ long long c_col(const GemmView& v, long long n) {
  return v.c_split > 0 ? (n % v.c_split) * v.c_n + (n / v.c_split) * v.c_n_hi : n * v.c_n;
}

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
  const bool n_fast = (v.c_n == 1 && v.c_split == 0) || v.c_m != 1;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int m = n_fast ? e / kBN : e % kBM;
    const int n = n_fast ? e % kBN : e / kBM;
    const long long gm = m0 + m, gn = n0 + n;
    if (gm < v.M && gn < v.N) C[gm * v.c_m + c_col(v, gn)] = from_float<TC>(Cs[m * LDC + n]);
  }
}

// Values of 16 bytes of T.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename S, typename T>
__device__ __forceinline__ S convert(T x) {
  if constexpr (std::is_same<S, T>::value) {
    return x;
  } else {
    return from_float<S>(to_float(x));
  }
}

// One thread's share of an operand tile staged as smem[slow][fast] (ld LD): kVec<T>-wide runs
// along the fast dim, read with one 16-byte load when `vec` (the fast dim has unit stride, the
// run lies inside the matrix, the address is aligned) and element by element otherwise, zero
// outside the matrix.
template <int SLOW, int FAST, typename T>
struct TileLoad {
  static constexpr int V = kVec<T>;
  static constexpr int kRuns = SLOW * FAST / (V * kThreads);
  static_assert(kRuns >= 1 && SLOW * FAST % (V * kThreads) == 0, "tile must split evenly");
  T val[kRuns][V];

  __device__ __forceinline__ void load(const T* p, long long s_stride, long long f_stride, long long s0,
                                       long long f0, long long s_lim, long long f_lim, bool vec) {
#pragma unroll
    for (int i = 0; i < kRuns; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const long long gs = s0 + e / (FAST / V), gf = f0 + (e % (FAST / V)) * V;
      if (vec && gs < s_lim && gf + V <= f_lim) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p + gs * s_stride + gf);
        memcpy(val[i], &raw, sizeof raw);
      } else {
#pragma unroll
        for (int u = 0; u < V; ++u)
          val[i][u] = (gs < s_lim && gf + u < f_lim) ? p[gs * s_stride + (gf + u) * f_stride] : from_float<T>(0.0f);
      }
    }
  }

  template <int LD, typename S>
  __device__ __forceinline__ void store(S* smem) const {
#pragma unroll
    for (int i = 0; i < kRuns; ++i) {
      const int e = threadIdx.x + i * kThreads;
      S* dst = smem + (e / (FAST / V)) * LD + (e % (FAST / V)) * V;
      if constexpr (std::is_same<S, T>::value) {  // one 16-byte store (LD * sizeof(S) is too)
        uint4 raw;
        memcpy(&raw, val[i], sizeof raw);
        *reinterpret_cast<uint4*>(dst) = raw;
      } else {
#pragma unroll
        for (int u = 0; u < V; ++u) dst[u] = convert<S>(val[i][u]);
      }
    }
  }
};

// Tensor-core path: S is __half or __nv_bfloat16; 8 warps, each owning a (BM/WARPS_M) x
// (BN/WARPS_N) block of 16 x 16 accumulator fragments. A_KFAST: A is staged As[m][k] (else
// As[k][m]); B_NFAST: B is staged Bs[k][n] (else Bs[n][k]).
template <typename S, int BM, int BN, bool A_KFAST, bool B_NFAST, typename TA, typename TB, typename TC>
__global__ void __launch_bounds__(kThreads)
    gemm_wmma_kernel(GemmView v, const TA* __restrict__ A, const TB* __restrict__ B, TC* __restrict__ C,
                     bool vec_a, bool vec_b, bool vec_c) {
  using namespace nvcuda;
  constexpr int BK = kBK;
  constexpr int WARPS_N = BN >= 128 ? 4 : 2, WARPS_M = 8 / WARPS_N;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N, FM = WM / 16, FN = WN / 16;
  constexpr int A_SLOW = A_KFAST ? BM : BK, A_FAST = A_KFAST ? BK : BM, LDA = A_FAST + 8;
  constexpr int B_SLOW = B_NFAST ? BK : BN, B_FAST = B_NFAST ? BN : BK, LDB = B_FAST + 8;
  constexpr int A_ELEMS = A_SLOW * LDA, B_ELEMS = B_SLOW * LDB;
  constexpr int kOperandBytes = (A_ELEMS + B_ELEMS) * static_cast<int>(sizeof(S));
  constexpr int kScratchBytes = 8 * 16 * 16 * static_cast<int>(sizeof(float));  // epilogue, per warp
  static_assert(A_ELEMS * sizeof(S) % 32 == 0, "B tile must start 256-bit aligned");
  __shared__ __align__(128) unsigned char smem[kOperandBytes > kScratchBytes ? kOperandBytes : kScratchBytes];
  S* As = reinterpret_cast<S*>(smem);
  S* Bs = As + A_ELEMS;
  using LayoutA = typename std::conditional<A_KFAST, wmma::row_major, wmma::col_major>::type;
  using LayoutB = typename std::conditional<B_NFAST, wmma::row_major, wmma::col_major>::type;

  const long long g = blockIdx.z;
  A += g * v.a_g;
  B += g * v.b_g;
  C += g * v.c_g;
  const long long m0 = static_cast<long long>(blockIdx.x) * BM;
  const long long n0 = static_cast<long long>(blockIdx.y) * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;

  TileLoad<A_SLOW, A_FAST, TA> ra;
  TileLoad<B_SLOW, B_FAST, TB> rb;
  auto load = [&](long long k0) {
    if constexpr (A_KFAST) {
      ra.load(A, v.a_m, v.a_k, m0, k0, v.M, v.K, vec_a);
    } else {
      ra.load(A, v.a_k, v.a_m, k0, m0, v.K, v.M, vec_a);
    }
    if constexpr (B_NFAST) {
      rb.load(B, v.b_k, v.b_n, k0, n0, v.K, v.N, vec_b);
    } else {
      rb.load(B, v.b_n, v.b_k, n0, k0, v.N, v.K, vec_b);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  load(0);
  for (long long k0 = 0; k0 < v.K; k0 += BK) {
    ra.template store<LDA>(As);
    rb.template store<LDB>(Bs);
    __syncthreads();
    if (k0 + BK < v.K) load(k0 + BK);  // in flight during the products below
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, S, LayoutA> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, S, LayoutB> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = wm + 16 * i;
        wmma::load_matrix_sync(fa[i], A_KFAST ? As + m * LDA + kk : As + kk * LDA + m, LDA);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn + 16 * j;
        wmma::load_matrix_sync(fb[j], B_NFAST ? Bs + kk * LDB + n : Bs + n * LDB + kk, LDB);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Each warp moves its fragments out through its own 16 x 16 scratch; a lane writes 8
  // consecutive columns of one row (one 16-byte store for 16-bit C with unit column stride).
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
  const int r = lane / 2, c = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const long long gm = m0 + wm + 16 * i + r, gn = n0 + wn + 16 * j + c;
      if (gm < v.M) {
        TC* row = C + gm * v.c_m;
        if (vec_c && gn + 8 <= v.N) {
          TC out[8];
#pragma unroll
          for (int u = 0; u < 8; ++u) out[u] = from_float<TC>(scratch[r * 16 + c + u]);
          uint4 raw;
          memcpy(&raw, out, sizeof raw);
          *reinterpret_cast<uint4*>(row + gn) = raw;
        } else {
#pragma unroll
          for (int u = 0; u < 8; ++u)
            if (gn + u < v.N) row[c_col(v, gn + u)] = from_float<TC>(scratch[r * 16 + c + u]);
        }
      }
      __syncwarp();
    }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte loads along an operand's fast dim: unit stride there, and every run of kVec<T>
// starting 16-byte aligned (the pointer and the other strides multiples of the run).
template <typename T>
bool vector_loads(const T* p, long long fast, long long slow, long long batch) {
  constexpr long long V = kVec<T>;
  return fast == 1 && aligned16(p) && slow % V == 0 && batch % V == 0;
}

template <typename S, int BM, int BN, bool A_KFAST, bool B_NFAST, typename TA, typename TB, typename TC>
void launch_wmma(const GemmView& v, const TA* A, const TB* B, TC* C, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((v.M + BM - 1) / BM), static_cast<unsigned>((v.N + BN - 1) / BN),
                  static_cast<unsigned>(v.batch));
  const bool vec_a = A_KFAST ? vector_loads(A, v.a_k, v.a_m, v.a_g) : vector_loads(A, v.a_m, v.a_k, v.a_g);
  const bool vec_b = B_NFAST ? vector_loads(B, v.b_n, v.b_k, v.b_g) : vector_loads(B, v.b_k, v.b_n, v.b_g);
  // 8 columns of C in one store: 16-bit C (8 x 2 bytes) with unit, unsplit column stride.
  const bool vec_c = sizeof(TC) == 2 && v.c_n == 1 && v.c_split == 0 && aligned16(C) && v.c_m % 8 == 0 &&
                     v.c_g % 8 == 0;
  gemm_wmma_kernel<S, BM, BN, A_KFAST, B_NFAST, TA, TB, TC><<<grid, kThreads, 0, stream>>>(v, A, B, C, vec_a, vec_b, vec_c);
}

template <typename S, int BM, int BN, typename TA, typename TB, typename TC>
void launch_wmma_oriented(const GemmView& v, const TA* A, const TB* B, TC* C, cudaStream_t stream) {
  // Stage each operand along its unit-stride dim (k for A, n for B when neither has one).
  const bool a_kfast = v.a_k == 1 || v.a_m != 1, b_nfast = v.b_n == 1 || v.b_k != 1;
  if (a_kfast && b_nfast) launch_wmma<S, BM, BN, true, true>(v, A, B, C, stream);
  if (a_kfast && !b_nfast) launch_wmma<S, BM, BN, true, false>(v, A, B, C, stream);
  if (!a_kfast && b_nfast) launch_wmma<S, BM, BN, false, true>(v, A, B, C, stream);
  if (!a_kfast && !b_nfast) launch_wmma<S, BM, BN, false, false>(v, A, B, C, stream);
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
  if constexpr (std::is_same<S, float>::value) {
    const dim3 grid(static_cast<unsigned>((v.M + kBM - 1) / kBM),
                    static_cast<unsigned>((v.N + kBN - 1) / kBN), static_cast<unsigned>(v.batch));
    gemm_fma_kernel<TA, TB, TC><<<grid, kThreads, 0, stream>>>(v, A, B, C);
  } else {
    // Large tiles reuse each staged value twice as often, but only pay while the grid keeps
    // every multiprocessor busy (a weight gradient has few output tiles and a long K).
    // EFFX_CUDA_GEMM_TILE=64 or =128 forces one (tests cover both on any shape).
    const long long big_tiles = ((v.M + 127) / 128) * ((v.N + 127) / 128) * v.batch;
    const char* force = std::getenv("EFFX_CUDA_GEMM_TILE");
    const bool big = force != nullptr && std::strcmp(force, "128") == 0   ? true
                     : force != nullptr && std::strcmp(force, "64") == 0 ? false
                                                                          : big_tiles >= 2LL * multiprocessors();
    if (big) {
      launch_wmma_oriented<S, 128, 128>(v, A, B, C, stream);
    } else {
      launch_wmma_oriented<S, 64, 64>(v, A, B, C, stream);
    }
  }
  return cudaGetLastError();
}

}  // namespace block_gemm
}  // namespace cuda
}  // namespace effx
