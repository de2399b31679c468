// effx family: DejaVu contextual sparsity, CUDA kernels (layout in include/effx/sparse.h).
//
// Up: one warp per (selected weight row, tile of batch rows). The warp streams the row with
// 16-byte loads, dots it with up to kBatchTile batch rows held in registers and reduces with
// shuffles; gate and up rows are read in the same pass. The weight row is read once per batch
// tile, the batch rows come from L1/L2.
// Down: a block owns a tile of output columns and a slice of the selected rows; its warps take
// the slice's rows round-robin, then add their partial sums in warp order through shared
// memory. Slices write fp32 partial sums to a workspace that a second kernel adds in slice
// order (plus the bias). No atomics anywhere: the result is the same on every launch.
#include <cstdint>

#include "dtype.cuh"
#include "effx/sparse_cuda.h"

namespace effx {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kUpWarps = 4;          // warps per block of the up kernel (small blocks spread evenly)
constexpr int kDownWarps = 4;        // warps per block of the down kernel
constexpr int kBatchTile = 8;        // largest batch tile held in registers
constexpr long long kDownBlocks = 512;  // blocks the down kernel aims for (slices fill the rest)
constexpr long long kMinRowsPerSlice = 16;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float activate(Activation act, float v) {
  switch (act) {
    case Activation::None: return v;
    case Activation::Relu: return v > 0.0f ? v : 0.0f;
    case Activation::Gelu: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case Activation::GeluTanh:
      return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case Activation::Silu: return v / (1.0f + expf(-v));
  }
  return v;
}

// Batch tiles of an up/down call: with a shared index set, tiles of BT rows; with one set
// per row, one tile per row (BT is 1 then).
__host__ __device__ inline long long batch_tiles(long long batch, long long idx_row_stride, int bt) {
  return idx_row_stride == 0 ? (batch + bt - 1) / bt : batch;
}

template <typename T, int VEC, int BT, bool GATED>
__global__ void __launch_bounds__(kUpWarps * kWarp)
up_kernel(SparseUpShape s, Activation act, const T* __restrict__ x, const T* __restrict__ w,
          const T* __restrict__ wg, const T* __restrict__ bu, const T* __restrict__ bg,
          const int64_t* __restrict__ idx, T* __restrict__ h) {
  const long long R = s.rows_per_index;
  const long long K = s.k * R;
  const bool shared = s.idx_row_stride == 0;
  const long long items = K * batch_tiles(s.batch, s.idx_row_stride, BT);
  const int lane = threadIdx.x % kWarp;
  const long long warps = static_cast<long long>(gridDim.x) * kUpWarps;
  for (long long item = blockIdx.x * static_cast<long long>(kUpWarps) + threadIdx.x / kWarp;
       item < items; item += warps) {
    // Neighbouring warps take neighbouring rows of one tile: the batch rows stay hot in L1.
    const long long j = item % K;
    const long long tile = item / K;
    const long long b0 = shared ? tile * BT : tile;
    const int64_t* ids = idx + (shared ? 0 : tile * s.idx_row_stride);
    const long long row = ids[j / R] * R + j % R;
    const T* wr = w + row * s.w_row_stride;
    const T* gr = GATED ? wg + row * s.w_row_stride : nullptr;
    float acc[BT], accg[BT];
#pragma unroll
    for (int t = 0; t < BT; ++t) acc[t] = accg[t] = 0.0f;
#pragma unroll 4
    for (long long c = static_cast<long long>(lane) * VEC; c < s.d; c += kWarp * VEC) {
      float wv[VEC], gv[VEC];
      load_floats<T, VEC>(wr + c, wv);
      if constexpr (GATED) load_floats<T, VEC>(gr + c, gv);
#pragma unroll
      for (int t = 0; t < BT; ++t) {
        if (b0 + t < s.batch) {
          float xv[VEC];
          load_floats<T, VEC>(x + (b0 + t) * s.x_row_stride + c, xv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            acc[t] = fmaf(xv[i], wv[i], acc[t]);
            if constexpr (GATED) accg[t] = fmaf(xv[i], gv[i], accg[t]);
          }
        }
      }
    }
    const float bias_up = bu ? to_float(bu[row]) : 0.0f;
    const float bias_gate = GATED && bg ? to_float(bg[row]) : 0.0f;
#pragma unroll
    for (int t = 0; t < BT; ++t) {
      const float u = warp_sum(acc[t]) + bias_up;
      const float g = GATED ? warp_sum(accg[t]) + bias_gate : 0.0f;
      if (lane == t && b0 + t < s.batch) {
        h[(b0 + t) * K + j] = from_float<T>(GATED ? activate(act, g) * u : activate(act, u));
      }
    }
  }
}

// Geometry of a down-projection launch, shared by the host launcher and the workspace size.
struct DownPlan {
  int vec;
  int bt;
  long long col_tiles, tiles, slices, rows_per_slice;
};

template <typename T>
bool aligned(const void* p, long long stride_elems, int vec) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec) == 0 && stride_elems % vec == 0;
}

int batch_tile_for(long long batch, long long idx_row_stride) {
  if (idx_row_stride != 0 || batch <= 1) return 1;
  if (batch <= 2) return 2;
  if (batch <= 4) return 4;
  return kBatchTile;
}

DownPlan plan_down(const SparseDownShape& s, int vec) {
  DownPlan p;
  p.vec = vec;
  p.bt = batch_tile_for(s.batch, s.idx_row_stride);
  const long long K = s.k * s.rows_per_index;
  p.col_tiles = (s.d + kWarp * vec - 1) / (kWarp * vec);
  p.tiles = batch_tiles(s.batch, s.idx_row_stride, p.bt);
  const long long base = p.col_tiles * p.tiles;
  long long slices = (kDownBlocks + base - 1) / base;
  const long long most = (K + kMinRowsPerSlice - 1) / kMinRowsPerSlice;
  slices = slices < most ? slices : most;
  slices = slices > 1 ? slices : 1;
  p.rows_per_slice = K > 0 ? (K + slices - 1) / slices : 0;
  p.slices = K > 0 ? (K + p.rows_per_slice - 1) / p.rows_per_slice : 0;
  return p;
}

// Partial sums of one (column tile, batch tile, slice) block. With a single slice the block
// writes the final values (bias added) to y; otherwise fp32 partials to ws[slice][b][c].
template <typename T, int VEC, int BT>
__global__ void __launch_bounds__(kDownWarps * kWarp)
down_kernel(SparseDownShape s, long long col_tiles, long long tiles, long long rows_per_slice,
            long long slices, const T* __restrict__ hmat, const T* __restrict__ w,
            const T* __restrict__ bias, const int64_t* __restrict__ idx, float* __restrict__ ws,
            T* __restrict__ y) {
  constexpr int kTile = kWarp * VEC;
  __shared__ float part[kDownWarps][BT][kTile];
  const long long R = s.rows_per_index;
  const long long K = s.k * R;
  const bool shared = s.idx_row_stride == 0;
  const long long block = blockIdx.x;
  const long long col_tile = block % col_tiles;
  const long long tile = (block / col_tiles) % tiles;
  const long long slice = block / (col_tiles * tiles);
  const long long b0 = shared ? tile * BT : tile;
  const int64_t* ids = idx + (shared ? 0 : tile * s.idx_row_stride);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const long long c = col_tile * kTile + static_cast<long long>(lane) * VEC;
  const long long first = slice * rows_per_slice;
  const long long last = first + rows_per_slice < K ? first + rows_per_slice : K;

  float acc[BT][VEC];
#pragma unroll
  for (int t = 0; t < BT; ++t) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[t][i] = 0.0f;
  }
  if (c < s.d) {
#pragma unroll 4
    for (long long j = first + warp; j < last; j += kDownWarps) {
      const long long row = ids[j / R] * R + j % R;
      float wv[VEC];
      load_floats<T, VEC>(w + row * s.w_row_stride + c, wv);
#pragma unroll
      for (int t = 0; t < BT; ++t) {
        const float hv = b0 + t < s.batch ? to_float(hmat[(b0 + t) * s.h_row_stride + j]) : 0.0f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[t][i] = fmaf(hv, wv[i], acc[t][i]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < BT; ++t) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) part[warp][t][lane * VEC + i] = acc[t][i];
  }
  __syncthreads();
  // Each thread finalizes some (batch row, column) pairs of the tile, adding warps in order.
  for (int e = threadIdx.x; e < BT * kTile; e += kDownWarps * kWarp) {
    const int t = e / kTile;
    const long long col = col_tile * kTile + e % kTile;
    const long long b = b0 + t;
    if (b >= s.batch || col >= s.d) continue;
    float v = 0.0f;
#pragma unroll
    for (int q = 0; q < kDownWarps; ++q) v += part[q][t][e % kTile];
    if (slices == 1) {
      y[b * s.d + col] = from_float<T>(bias ? v + to_float(bias[col]) : v);
    } else {
      ws[(slice * s.batch + b) * s.d + col] = v;
    }
  }
}

template <typename T>
__global__ void down_finish_kernel(long long batch, long long d, long long slices,
                                   const float* __restrict__ ws, const T* __restrict__ bias,
                                   T* __restrict__ y) {
  const long long total = batch * d;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (long long q = 0; q < slices; ++q) v += ws[q * total + e];
    y[e] = from_float<T>(bias ? v + to_float(bias[e % d]) : v);
  }
}

template <typename T, int VEC, bool GATED>
cudaError_t launch_up(const SparseUpShape& s, Activation act, const T* x, const T* w, const T* wg,
                      const T* bu, const T* bg, const int64_t* idx, T* h, cudaStream_t stream) {
  const int bt = batch_tile_for(s.batch, s.idx_row_stride);
  const long long warps = s.k * s.rows_per_index * batch_tiles(s.batch, s.idx_row_stride, bt);
  const unsigned int grid = grid_for(warps * kWarp, kUpWarps * kWarp);
  const dim3 block(kUpWarps * kWarp);
  switch (bt) {
    case 1: up_kernel<T, VEC, 1, GATED><<<grid, block, 0, stream>>>(s, act, x, w, wg, bu, bg, idx, h); break;
    case 2: up_kernel<T, VEC, 2, GATED><<<grid, block, 0, stream>>>(s, act, x, w, wg, bu, bg, idx, h); break;
    case 4: up_kernel<T, VEC, 4, GATED><<<grid, block, 0, stream>>>(s, act, x, w, wg, bu, bg, idx, h); break;
    default: up_kernel<T, VEC, kBatchTile, GATED><<<grid, block, 0, stream>>>(s, act, x, w, wg, bu, bg, idx, h);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t up_typed(const SparseUpShape& s, Activation act, const void* x, const void* w,
                     const void* wg, const void* bu, const void* bg, const int64_t* idx, void* h,
                     cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(w);
  const T* gt = static_cast<const T*>(wg);
  const T* but = static_cast<const T*>(bu);
  const T* bgt = static_cast<const T*>(bg);
  T* ht = static_cast<T*>(h);
  const bool vec = s.d % kVec == 0 && aligned<T>(x, s.x_row_stride, kVec) &&
                   aligned<T>(w, s.w_row_stride, kVec) && (!wg || aligned<T>(wg, s.w_row_stride, kVec));
  if (wg) {
    return vec ? launch_up<T, kVec, true>(s, act, xt, wt, gt, but, bgt, idx, ht, stream)
               : launch_up<T, 1, true>(s, act, xt, wt, gt, but, bgt, idx, ht, stream);
  }
  return vec ? launch_up<T, kVec, false>(s, act, xt, wt, gt, but, bgt, idx, ht, stream)
             : launch_up<T, 1, false>(s, act, xt, wt, gt, but, bgt, idx, ht, stream);
}

template <typename T, int VEC>
cudaError_t launch_down(const SparseDownShape& s, const DownPlan& p, const T* h, const T* w,
                        const T* bias, const int64_t* idx, float* ws, T* y, cudaStream_t stream) {
  if (p.slices > 0) {
    const long long blocks = p.col_tiles * p.tiles * p.slices;
    if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned int>(blocks)), block(kDownWarps * kWarp);
    switch (p.bt) {
      case 1: down_kernel<T, VEC, 1><<<grid, block, 0, stream>>>(s, p.col_tiles, p.tiles, p.rows_per_slice, p.slices, h, w, bias, idx, ws, y); break;
      case 2: down_kernel<T, VEC, 2><<<grid, block, 0, stream>>>(s, p.col_tiles, p.tiles, p.rows_per_slice, p.slices, h, w, bias, idx, ws, y); break;
      case 4: down_kernel<T, VEC, 4><<<grid, block, 0, stream>>>(s, p.col_tiles, p.tiles, p.rows_per_slice, p.slices, h, w, bias, idx, ws, y); break;
      default: down_kernel<T, VEC, kBatchTile><<<grid, block, 0, stream>>>(s, p.col_tiles, p.tiles, p.rows_per_slice, p.slices, h, w, bias, idx, ws, y);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.slices == 1) return err;
  }
  // No selected rows: y is the bias (or zero); several slices: add their partial sums in order.
  const unsigned int grid = grid_for(s.batch * s.d, 256);
  down_finish_kernel<T><<<grid, 256, 0, stream>>>(s.batch, s.d, p.slices, ws, bias, y);
  return cudaGetLastError();
}

template <typename T>
bool down_vectorized(const SparseDownShape& s, const void* w) {
  constexpr int kVec = 16 / sizeof(T);
  return s.d % kVec == 0 && aligned<T>(w, s.w_row_stride, kVec);
}

template <typename T>
cudaError_t down_typed(const SparseDownShape& s, const void* h, const void* w, const void* bias,
                       const int64_t* idx, float* ws, void* y, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* ht = static_cast<const T*>(h);
  const T* wt = static_cast<const T*>(w);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  if (down_vectorized<T>(s, w)) {
    return launch_down<T, kVec>(s, plan_down(s, kVec), ht, wt, bt, idx, ws, yt, stream);
  }
  return launch_down<T, 1>(s, plan_down(s, 1), ht, wt, bt, idx, ws, yt, stream);
}

}  // namespace

cudaError_t sparse_mlp_up(const SparseUpShape& s, DType dtype, Activation act, const void* x,
                          const void* w_up, const void* w_gate, const void* b_up,
                          const void* b_gate, const int64_t* idx, void* h, cudaStream_t stream) {
  if (s.batch == 0 || s.k == 0 || s.rows_per_index == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return up_typed<float>(s, act, x, w_up, w_gate, b_up, b_gate, idx, h, stream);
    case DType::Float16:
      return up_typed<__half>(s, act, x, w_up, w_gate, b_up, b_gate, idx, h, stream);
    case DType::BFloat16:
      return up_typed<__nv_bfloat16>(s, act, x, w_up, w_gate, b_up, b_gate, idx, h, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

int64_t sparse_mlp_down_workspace(const SparseDownShape& s, DType dtype) {
  // Whether the vector path is taken depends on the weight pointer, so size for the larger
  // plan: the scalar path has more column tiles, hence never more slices.
  const int vec = 16 / dtype_size(dtype);
  const DownPlan p = plan_down(s, vec);
  const DownPlan q = plan_down(s, 1);
  const long long slices = p.slices > q.slices ? p.slices : q.slices;
  return slices > 1 ? slices * s.batch * s.d : 0;
}

cudaError_t sparse_mlp_down(const SparseDownShape& s, DType dtype, const void* h,
                            const void* w_down_t, const void* b_down, const int64_t* idx,
                            float* workspace, void* y, cudaStream_t stream) {
  if (s.batch == 0 || s.d == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return down_typed<float>(s, h, w_down_t, b_down, idx, workspace, y, stream);
    case DType::Float16:
      return down_typed<__half>(s, h, w_down_t, b_down, idx, workspace, y, stream);
    case DType::BFloat16:
      return down_typed<__nv_bfloat16>(s, h, w_down_t, b_down, idx, workspace, y, stream);
    case DType::Float64: break;  // not a storage dtype of this family (the op layer rejects it)
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace effx
