// effx SIMT emulator: the fiber scheduler behind simt.h and the runtime calls of
// cuda_runtime_api.h.
#include "simt.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_runtime_api.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// A fiber switch: save the callee-saved registers on this stack, store its pointer in *from,
// load `to` and pop the next fiber's registers (x86-64 System V; ucontext's swapcontext also
// swaps the signal mask, a system call per switch that made the emulator five times slower).
extern "C" void effx_simt_switch(void** from, void* to);
asm(R"(
  .text
  .globl effx_simt_switch
  .type effx_simt_switch, @function
effx_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size effx_simt_switch, .-effx_simt_switch
  .section .note.GNU-stack, "", @progbits
  .text
)");

namespace effx {
namespace simt {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;

struct Barrier {
  unsigned long long generation = 0;
  unsigned arrived = 0;
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  std::unique_ptr<char[]> stack;
  uint3 tid;
  unsigned linear = 0;
  bool done = false;
  const unsigned long long* waits_on = nullptr;  // a barrier's generation, while it waits there
  unsigned long long waits_for = 0;
};

struct Scheduler {
  std::vector<Fiber> fibers;
  void* main_sp = nullptr;
  unsigned current = 0, alive = 0;
  const std::function<void()>* body = nullptr;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<unsigned> warp_live;  // bit per live lane
  std::vector<uint64_t> slots;      // a shuffle's published values, 32 per warp
  struct AlignedDelete {
    void operator()(char* p) const { ::operator delete[](p, std::align_val_t{128}); }
  };
  std::unique_ptr<char[], AlignedDelete> dynamic_shared;  // 128-byte aligned, as __align__(128) asks
  size_t dynamic_shared_bytes = 0;
  std::map<const void*, size_t> limits;
  cudaError_t error = cudaSuccess;
  std::mt19937 rng{20261201u};
};

Scheduler& sched() {
  static Scheduler s;
  return s;
}

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "simt: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x, threadIdx.y, threadIdx.z);
  std::abort();
}

[[noreturn]] void entry() {
  Scheduler& s = sched();
  (*s.body)();
  Fiber& f = s.fibers[s.current];
  f.done = true;
  effx_simt_switch(&f.sp, s.main_sp);
  std::abort();  // a finished fiber is never resumed
}

// A fresh stack whose first switch "returns" into entry() with the ABI's alignment: six zero
// registers, then entry's address, then a slot for entry's own (never used) return address.
void* fresh_stack(char* stack) {
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~static_cast<uintptr_t>(15);
  void** sp = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(&entry);
  sp[7] = nullptr;
  return sp;
}

// The calling fiber arrives; the last of `expected` releases the others.
void arrive(Barrier& b, unsigned expected) {
  Scheduler& s = sched();
  const unsigned long long generation = b.generation;
  if (++b.arrived == expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  Fiber& f = s.fibers[s.current];
  f.waits_on = &b.generation;
  f.waits_for = generation;
  effx_simt_switch(&f.sp, s.main_sp);
}

unsigned popcount(unsigned x) { return static_cast<unsigned>(__builtin_popcount(x)); }

void release_if_complete(Barrier& b, unsigned expected) {
  if (b.arrived > 0 && b.arrived == expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

void run_block(unsigned threads) {
  Scheduler& s = sched();
  const unsigned warps = (threads + 31) / 32;
  s.alive = threads;
  s.block = Barrier{};
  s.warps.assign(warps, Barrier{});
  s.warp_live.assign(warps, 0u);
  s.slots.assign(warps * 32, 0u);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.linear = t;
    f.tid = uint3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.done = false;
    f.waits_on = nullptr;
    f.sp = fresh_stack(f.stack.get());
    s.warp_live[t / 32] |= 1u << (t % 32);
  }
  // Shared memory starts as garbage (NaN patterns), as it may on a GPU.
  if (s.dynamic_shared_bytes) std::memset(s.dynamic_shared.get(), 0xff, s.dynamic_shared_bytes);
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), 0u);
  while (s.alive > 0) {
    std::shuffle(order.begin(), order.end(), s.rng);
    bool progressed = false;
    for (const unsigned t : order) {
      Fiber& f = s.fibers[t];
      if (f.done || (f.waits_on && *f.waits_on == f.waits_for)) continue;
      f.waits_on = nullptr;
      s.current = t;
      threadIdx = f.tid;
      effx_simt_switch(&s.main_sp, f.sp);
      progressed = true;
      if (f.done) {
        --s.alive;
        const unsigned w = t / 32;
        s.warp_live[w] &= ~(1u << (t % 32));
        release_if_complete(s.block, s.alive);
        release_if_complete(s.warps[w], popcount(s.warp_live[w]));
      }
    }
    if (!progressed) fail("deadlock: the live threads wait at barriers that cannot complete");
  }
}

}  // namespace

void run_grid(const LaunchConfig& cfg, const std::function<void()>& body) {
  Scheduler& s = sched();
  const unsigned long long threads = 1ull * cfg.block.x * cfg.block.y * cfg.block.z;
  const unsigned long long blocks = 1ull * cfg.grid.x * cfg.grid.y * cfg.grid.z;
  if (threads == 0 || threads > 1024 || cfg.block.z > 64 || blocks == 0 || cfg.grid.y > 65535 ||
      cfg.grid.z > 65535 || cfg.grid.x > 0x7fffffffu) {
    s.error = cudaErrorInvalidConfiguration;
    return;
  }
  if (cfg.smem > dynamic_shared_limit(cfg.kernel)) {
    s.error = cudaErrorInvalidValue;
    return;
  }
  if (s.fibers.size() < threads) {
    s.fibers.resize(threads);
    for (Fiber& f : s.fibers) {
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
    }
  }
  s.dynamic_shared_bytes = cfg.smem;
  s.dynamic_shared.reset(cfg.smem ? new (std::align_val_t{128}) char[(cfg.smem + 127) / 128 * 128] : nullptr);
  s.body = &body;
  blockDim = cfg.block;
  gridDim = cfg.grid;
  std::vector<unsigned long long> order(blocks);
  std::iota(order.begin(), order.end(), 0ull);
  std::shuffle(order.begin(), order.end(), s.rng);
  for (const unsigned long long id : order) {
    blockIdx = uint3{static_cast<unsigned>(id % cfg.grid.x), static_cast<unsigned>(id / cfg.grid.x % cfg.grid.y),
                     static_cast<unsigned>(id / (1ull * cfg.grid.x * cfg.grid.y))};
    run_block(static_cast<unsigned>(threads));
  }
}

void* dynamic_shared_base() { return sched().dynamic_shared.get(); }

size_t dynamic_shared_limit(const void* kernel) {
  const auto& limits = sched().limits;
  const auto it = limits.find(kernel);
  return it == limits.end() ? kDefaultDynamicShared : it->second;
}

void set_dynamic_shared_limit(const void* kernel, size_t bytes) { sched().limits[kernel] = bytes; }

cudaError_t take_error() {
  const cudaError_t e = sched().error;
  sched().error = cudaSuccess;
  return e;
}

void syncthreads() {
  Scheduler& s = sched();
  arrive(s.block, s.alive);
}

namespace {
// The warp of the calling thread, after checking that `mask` names every live lane.
unsigned collective_warp(unsigned mask) {
  Scheduler& s = sched();
  const unsigned w = s.fibers[s.current].linear / 32;
  const unsigned live = s.warp_live[w];
  if ((mask & live) != live) fail("a warp-collective call whose mask leaves out live lanes (unsupported here)");
  return w;
}
}  // namespace

void syncwarp(unsigned mask) {
  Scheduler& s = sched();
  const unsigned w = collective_warp(mask);
  arrive(s.warps[w], popcount(s.warp_live[w]));
}

void exchange(unsigned mask, const void* mine, void* out, size_t bytes, int src) {
  Scheduler& s = sched();
  const unsigned w = collective_warp(mask), lane = s.fibers[s.current].linear % 32;
  std::memcpy(&s.slots[w * 32 + lane], mine, bytes);
  arrive(s.warps[w], popcount(s.warp_live[w]));
  const bool valid = src >= 0 && src < 32 && ((s.warp_live[w] >> src) & 1u);
  std::memcpy(out, &s.slots[w * 32 + (valid ? static_cast<unsigned>(src) : lane)], bytes);
  arrive(s.warps[w], popcount(s.warp_live[w]));
}

unsigned ballot(unsigned mask, bool pred) {
  Scheduler& s = sched();
  const unsigned w = collective_warp(mask), lane = s.fibers[s.current].linear % 32;
  s.slots[w * 32 + lane] = pred ? 1u : 0u;
  arrive(s.warps[w], popcount(s.warp_live[w]));
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (((s.warp_live[w] >> l) & 1u) && s.slots[w * 32 + l]) bits |= 1u << l;
  }
  arrive(s.warps[w], popcount(s.warp_live[w]));
  return bits & mask;
}

unsigned lane_id() { return sched().fibers[sched().current].linear % 32; }

}  // namespace simt
}  // namespace effx

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// An H200's, so the kernels plan their grids as they would there.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaGetLastError() { return effx::simt::take_error(); }
const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
  }
  return "unknown error";
}
