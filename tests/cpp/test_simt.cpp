// effx C++ test of the SIMT emulator itself (tests/cpp/simt): the warp shuffles and ballot
// against their CUDA definitions, __syncthreads ordering shared-memory writes before reads,
// partial last warps, dynamic shared memory and its opt-in limit, grid and block indices, and
// the launch errors a GPU would give. Written against the emulator directly (launches as
// translate.py rewrites them).
#include <cuda_runtime_api.h>

#include <cstdio>
#include <vector>

#include "check.h"

namespace {

__global__ void shuffles(int* out) {
  const int lane = static_cast<int>(threadIdx.x % 32), base = static_cast<int>(threadIdx.x) * 6;
  out[base + 0] = __shfl_xor_sync(0xffffffffu, lane, 5);
  out[base + 1] = __shfl_up_sync(0xffffffffu, lane, 3);
  out[base + 2] = __shfl_down_sync(0xffffffffu, lane, 7, 16);
  out[base + 3] = __shfl_sync(0xffffffffu, lane, 9);
  out[base + 4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  int sum = lane;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  out[base + 5] = sum;
}

// Each thread writes its slot, then reads its neighbour's after the barrier: the barrier must
// hold every write back until all are done.
__global__ void neighbours(int* out) {
  int* slots = ::effx::simt::dynamic_shared<int>();  // what translate.py makes of extern __shared__
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  for (int round = 0; round < 4; ++round) {
    slots[t] = t * 10 + round;
    __syncthreads();
    out[(blockIdx.x * 4 + round) * n + t] = slots[(t + 1) % n];
    __syncthreads();
  }
}

__global__ void indices(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * threadIdx.y;
  out[block * blockDim.x * blockDim.y + thread] = block * 1000 + thread;
}

}  // namespace

int main() {
  std::vector<int> sh(64 * 6);
  ::effx::simt::launch(shuffles, 1, 64)(sh.data());
  EFFX_EXPECT(cudaGetLastError() == cudaSuccess, "shuffles launch");
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, *o = &sh[t * 6];
    unsigned ballot = 0;
    for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
    EFFX_EXPECT(o[0] == (lane ^ 5), "xor at %d: %d", t, o[0]);
    EFFX_EXPECT(o[1] == (lane >= 3 ? lane - 3 : lane), "up at %d: %d", t, o[1]);
    EFFX_EXPECT(o[2] == (lane % 16 + 7 < 16 ? lane + 7 : lane), "down width 16 at %d: %d", t, o[2]);
    EFFX_EXPECT(o[3] == 9, "broadcast at %d: %d", t, o[3]);
    EFFX_EXPECT(static_cast<unsigned>(o[4]) == ballot, "ballot at %d: %x", t, o[4]);
    EFFX_EXPECT(o[5] == 31 * 32 / 2, "butterfly sum at %d: %d", t, o[5]);
  }

  // A block of 80 threads: a partial last warp, and more threads than one warp's barrier.
  const int n = 80, blocks = 3;
  std::vector<int> nb(blocks * 4 * n);
  ::effx::simt::launch(neighbours, blocks, n, n * sizeof(int))(nb.data());
  EFFX_EXPECT(cudaGetLastError() == cudaSuccess, "neighbours launch");
  for (int b = 0; b < blocks; ++b)
    for (int r = 0; r < 4; ++r)
      for (int t = 0; t < n; ++t) {
        EFFX_EXPECT(nb[(b * 4 + r) * n + t] == ((t + 1) % n) * 10 + r, "block %d round %d thread %d", b, r, t);
      }

  std::vector<unsigned> ix(2 * 3 * 2 * 8 * 4, 0);
  ::effx::simt::launch(indices, dim3(2, 3, 2), dim3(8, 4))(ix.data());
  for (unsigned i = 0; i < ix.size(); ++i) EFFX_EXPECT(ix[i] == i / 32 * 1000 + i % 32, "index %u: %u", i, ix[i]);

  // Launch errors: too many threads; dynamic shared memory over 48 KB without the opt-in.
  ::effx::simt::launch(indices, 1, 2048)(ix.data());
  EFFX_EXPECT(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048 threads must not launch");
  EFFX_EXPECT(cudaGetLastError() == cudaSuccess, "the error is cleared once read");
  ::effx::simt::launch(neighbours, 1, 32, 64 * 1024)(nb.data());
  EFFX_EXPECT(cudaGetLastError() != cudaSuccess, "64 KB of dynamic shared memory needs the opt-in");
  EFFX_EXPECT(cudaFuncSetAttribute(neighbours, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
              "opt-in");
  ::effx::simt::launch(neighbours, 1, 32, 64 * 1024)(nb.data());
  EFFX_EXPECT(cudaGetLastError() == cudaSuccess, "64 KB after the opt-in");
  std::printf("simt: ok\n");
  return 0;
}
