// effx family: Pixelated butterfly block-sparse matmul, CUDA kernels (layout in
// include/effx/pixelfly.h). One 256-thread block computes a 64 x 64 output tile (64 rows x
// one block of <= 64 outputs, or one whole grad block) in fp32 registers, 4 x 4 per thread,
// staging 64 x 32 slices of both operands in shared memory. The K loop runs over the stored
// blocks that feed the tile, so each output is written once and no atomics are needed.
#include "dtype.cuh"
#include "effx/pixelfly_cuda.h"

namespace effx {
namespace cuda {
namespace {

constexpr int kTile = 64, kStep = 32, kThreads = 256;
constexpr int kLdA = kStep + 1, kLdB = kTile + 4;

__host__ __device__ inline long long token_tiles(long long rows) { return (rows + kTile - 1) / kTile; }

struct Tile {
  float acc[4][4];
};

// acc(m, n) += sum_k As[m][k] Bs[k][n] over one staged step; m = ty + 16 i, n = tx + 16 j.
__device__ __forceinline__ void fma_step(const float* As, const float* Bs, Tile& t) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 8
  for (int k = 0; k < kStep; ++k) {
    float a[4], b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = As[(ty + 16 * i) * kLdA + k];
#pragma unroll
    for (int j = 0; j < 4; ++j) b[j] = Bs[k * kLdB + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) t.acc[i][j] = fmaf(a[i], b[j], t.acc[i][j]);
  }
}

// dst[m * ld + n] for m < rows_left, n < cols.
template <typename T>
__device__ __forceinline__ void store(const Tile& t, T* dst, long long ld, long long rows_left,
                                      int cols) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = ty + 16 * i, n = tx + 16 * j;
      if (m < rows_left && n < cols) dst[m * ld + n] = from_float<T>(t.acc[i][j]);
    }
}

// out tile (rows t0.., block-row rb): sum over the row's blocks of x[t, col*bs + b] W[a, b].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(BlockSparseShape s, const T* __restrict__ x, const T* __restrict__ blocks,
                   const int64_t* __restrict__ row_offsets, const int64_t* __restrict__ cols,
                   T* __restrict__ out) {
  __shared__ float As[kTile * kLdA];
  __shared__ float Bs[kStep * kLdB];
  const long long t0 = blockIdx.x % token_tiles(s.rows) * kTile;
  const long long rb = blockIdx.x / token_tiles(s.rows);
  const int bs = static_cast<int>(s.block);
  Tile t = {};
  const long long e_end = min(static_cast<long long>(row_offsets[rb + 1]), static_cast<long long>(s.nnz));
  for (long long e = max(static_cast<long long>(row_offsets[rb]), 0LL); e < e_end; ++e) {
    const long long cb = cols[e];
    if (cb < 0 || cb >= s.col_blocks) continue;
    for (int b0 = 0; b0 < bs; b0 += kStep) {
      for (int v = threadIdx.x; v < kTile * kStep; v += kThreads) {
        const int m = v / kStep, k = v % kStep;
        const bool ok = t0 + m < s.rows && b0 + k < bs;
        As[m * kLdA + k] = ok ? to_float(x[(t0 + m) * s.x_row_stride + cb * bs + b0 + k]) : 0.0f;
      }
      for (int v = threadIdx.x; v < kStep * kTile; v += kThreads) {
        const int n = v / kStep, k = v % kStep;
        const bool ok = n < bs && b0 + k < bs;
        Bs[k * kLdB + n] = ok ? to_float(blocks[(e * bs + n) * bs + b0 + k]) : 0.0f;
      }
      __syncthreads();
      fma_step(As, Bs, t);
      __syncthreads();
    }
  }
  const long long n_out = s.row_blocks * s.block;
  store(t, out + t0 * n_out + rb * bs, n_out, s.rows - t0, bs);
}

// grad_x tile (rows t0.., block-column cb): sum over blocks in column cb of dout[t, rb*bs + a] W[a, b].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(BlockSparseShape s, const T* __restrict__ dout, const T* __restrict__ blocks,
                  const int64_t* __restrict__ row_offsets, const int64_t* __restrict__ cols,
                  T* __restrict__ dx) {
  __shared__ float As[kTile * kLdA];
  __shared__ float Bs[kStep * kLdB];
  const long long t0 = blockIdx.x % token_tiles(s.rows) * kTile;
  const long long cb = blockIdx.x / token_tiles(s.rows);
  const int bs = static_cast<int>(s.block);
  const long long n_out = s.row_blocks * s.block;
  Tile t = {};
  for (long long rb = 0; rb < s.row_blocks; ++rb) {
    const long long e_end = min(static_cast<long long>(row_offsets[rb + 1]), static_cast<long long>(s.nnz));
    for (long long e = max(static_cast<long long>(row_offsets[rb]), 0LL); e < e_end; ++e) {
      if (cols[e] != cb) continue;
      for (int a0 = 0; a0 < bs; a0 += kStep) {
        for (int v = threadIdx.x; v < kTile * kStep; v += kThreads) {
          const int m = v / kStep, k = v % kStep;
          const bool ok = t0 + m < s.rows && a0 + k < bs;
          As[m * kLdA + k] = ok ? to_float(dout[(t0 + m) * n_out + rb * bs + a0 + k]) : 0.0f;
        }
        for (int v = threadIdx.x; v < kStep * kTile; v += kThreads) {
          const int k = v / kTile, n = v % kTile;
          const bool ok = n < bs && a0 + k < bs;
          Bs[k * kLdB + n] = ok ? to_float(blocks[(e * bs + a0 + k) * bs + n]) : 0.0f;
        }
        __syncthreads();
        fma_step(As, Bs, t);
        __syncthreads();
      }
    }
  }
  const long long n_in = s.col_blocks * s.block;
  store(t, dx + t0 * n_in + cb * bs, n_in, s.rows - t0, bs);
}

// grad of stored block e: sum over all rows t of dout[t, rb*bs + a] x[t, cb*bs + b].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_blocks_kernel(BlockSparseShape s, const T* __restrict__ dout, const T* __restrict__ x,
                       const int64_t* __restrict__ row_offsets, const int64_t* __restrict__ cols,
                       T* __restrict__ dblocks) {
  __shared__ float As[kTile * kLdA];
  __shared__ float Bs[kStep * kLdB];
  const long long e = blockIdx.x;
  const int bs = static_cast<int>(s.block);
  const long long n_out = s.row_blocks * s.block;
  // The block-row holding entry e: the last rb with row_offsets[rb] <= e.
  long long lo = 0, hi = s.row_blocks - 1;
  while (lo < hi) {
    const long long mid = (lo + hi + 1) / 2;
    if (row_offsets[mid] <= e) lo = mid; else hi = mid - 1;
  }
  const long long rb = lo, cb = cols[e];
  Tile t = {};
  if (cb >= 0 && cb < s.col_blocks) {
    for (long long r0 = 0; r0 < s.rows; r0 += kStep) {
      for (int v = threadIdx.x; v < kTile * kStep; v += kThreads) {
        const int k = v / kTile, m = v % kTile;
        const bool ok = m < bs && r0 + k < s.rows;
        As[m * kLdA + k] = ok ? to_float(dout[(r0 + k) * n_out + rb * bs + m]) : 0.0f;
      }
      for (int v = threadIdx.x; v < kStep * kTile; v += kThreads) {
        const int k = v / kTile, n = v % kTile;
        const bool ok = n < bs && r0 + k < s.rows;
        Bs[k * kLdB + n] = ok ? to_float(x[(r0 + k) * s.x_row_stride + cb * bs + n]) : 0.0f;
      }
      __syncthreads();
      fma_step(As, Bs, t);
      __syncthreads();
    }
  }
  store(t, dblocks + e * bs * bs, bs, bs, bs);
}

// One block per (block row or column, token tile), on grid x alone (y stops at 65535 block rows,
// which block size 1 reaches); the token tiles of one block row run next to each other.
unsigned grid_for_blocks(long long rows, long long blocks) {
  return static_cast<unsigned>(token_tiles(rows) * blocks);
}

template <typename F>
cudaError_t by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float64: return cudaErrorInvalidValue;  // CPU only (checked by the op layer)
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t block_sparse_forward(const BlockSparseShape& s, DType dtype, const void* x,
                                 const void* blocks, const int64_t* row_offsets,
                                 const int64_t* col_indices, void* out, cudaStream_t stream) {
  if (s.rows == 0 || s.row_blocks == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T><<<grid_for_blocks(s.rows, s.row_blocks), kThreads, 0,
                        stream>>>(s, static_cast<const T*>(x), static_cast<const T*>(blocks),
                                  row_offsets, col_indices, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t block_sparse_backward(const BlockSparseShape& s, DType dtype, const void* grad_out,
                                  const void* x, const void* blocks, const int64_t* row_offsets,
                                  const int64_t* col_indices, void* grad_x, void* grad_blocks,
                                  cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (s.rows > 0 && s.col_blocks > 0) {
      grad_x_kernel<T><<<grid_for_blocks(s.rows, s.col_blocks), kThreads, 0,
                         stream>>>(s, static_cast<const T*>(grad_out),
                                   static_cast<const T*>(blocks), row_offsets, col_indices,
                                   static_cast<T*>(grad_x));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (s.nnz > 0) {
      grad_blocks_kernel<T><<<static_cast<unsigned>(s.nnz), kThreads, 0, stream>>>(
          s, static_cast<const T*>(grad_out), static_cast<const T*>(x), row_offsets, col_indices,
          static_cast<T*>(grad_blocks));
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace effx
