// effx SIMT emulator: runs the CUDA kernels of csrc/kernels/cuda on the CPU, so the C++ tests
// check their indexing, their barriers and their results against the CPU kernels on machines
// without a GPU (CI). Every thread of a block is a fiber on one OS thread; fibers switch only
// at barriers (__syncthreads, and the warp barrier inside each shuffle), in a shuffled order,
// so a read of shared memory that lacks its barrier sees another order on another run. Blocks
// run one at a time in a shuffled order, which is why __shared__ may be a static variable.
// Warps are 32 lanes; a warp-collective call must come from every live lane of the warp.
//
// Dynamic shared memory starts as NaN bytes in every block, as garbage may on a GPU; static
// __shared__ arrays start at zero once and keep their contents from block to block.
//
// What it cannot see: timing, memory coalescing, bank conflicts, register pressure, hardware
// rounding of the fast intrinsics (__expf is expf here), races between blocks, reads of static
// shared memory before it is written, and code that relies on lockstep warps without a
// __syncwarp (which real GPUs do not promise either since Volta).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// The vector types, with the alignment their loads need on a GPU (a misaligned one may fault
// here too: the compiler is free to use aligned SSE moves).
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace effx {
namespace simt {

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  const void* kernel;
};

// Runs body once per thread of every block of the grid; records a launch error instead when
// the configuration is one a GPU would refuse.
void run_grid(const LaunchConfig& cfg, const std::function<void()>& body);
void* dynamic_shared_base();
size_t dynamic_shared_limit(const void* kernel);
void set_dynamic_shared_limit(const void* kernel, size_t bytes);
cudaError_t take_error();

void syncthreads();
void syncwarp(unsigned mask);
// Every live lane of the warp publishes `bytes` of its value, then reads lane src's (its own
// when src is out of range).
void exchange(unsigned mask, const void* mine, void* out, size_t bytes, int src);
unsigned ballot(unsigned mask, bool pred);
unsigned lane_id();

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchConfig cfg;
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<P...> params(std::forward<A>(args)...);
    run_grid(cfg, [&] { std::apply(kernel, params); });
  }
};

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to launch(kernel, grid, block, smem, stream)(args).
template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, LaunchConfig{grid, block, smem, reinterpret_cast<const void*>(kernel)}};
}

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_base());
}

template <typename T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  T out;
  exchange(mask, &v, &out, sizeof(T), src);
  return out;
}

}  // namespace simt
}  // namespace effx

inline void __syncthreads() { effx::simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { effx::simt::syncwarp(mask); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = static_cast<int>(effx::simt::lane_id());
  return effx::simt::shuffle(mask, v, lane / width * width + src % width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = static_cast<int>(effx::simt::lane_id()), src = lane ^ lane_mask;
  return effx::simt::shuffle(mask, v, src / width == lane / width ? src : lane);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(effx::simt::lane_id()), src = lane - static_cast<int>(delta);
  return effx::simt::shuffle(mask, v, src >= lane / width * width ? src : lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = static_cast<int>(effx::simt::lane_id()), src = lane + static_cast<int>(delta);
  return effx::simt::shuffle(mask, v, src / width == lane / width ? src : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return effx::simt::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return effx::simt::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  return effx::simt::ballot(mask, pred != 0) == effx::simt::ballot(mask, true);
}

#include <cmath>
#include <type_traits>

// CUDA's global min/max overloads, for any pair of arithmetic types.
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
// Saturating, as the hardware conversion is (NaN gives 0).
inline unsigned __float2uint_rn(float x) {
  if (!(x > 0.0f)) return 0u;
  if (x >= 4294967295.0f) return 0xffffffffu;
  return static_cast<unsigned>(std::nearbyint(x));
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// One OS thread runs every fiber, so a plain read-modify-write is atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
